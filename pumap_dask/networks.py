"""Custom encoder and decoder networks: factories, wrappers and their specs.

The reconstruction term and ``inverse_transform`` are :mod:`pumap_dask.reconstruction`'s.

Custom networks
---------------
``ParametricUMAP(encoder=...)`` takes

* a ``torch.nn.Module`` mapping (batch, n_features), or (batch, *dims) for n-D input such
  as images, to (batch, n_components);
* a *factory*: a callable called once with the input's size (the feature count as an int
  for 2-D input, the trailing shape as a tuple for n-D input) that returns such a module;
* a string ``"package.module:function"`` naming an importable factory.

``decoder=`` takes the same forms; a decoder maps (batch, n_components) to the input's
shape (or to flat rows), and its factory is called with the same argument as the
encoder's.

The kNN, the graph and the default MLP see flattened rows (n, prod(dims)); a custom
encoder (decoder) receives (produces) rows of the original shape: :class:`CustomEncoder`
reshapes around the user's network, so training and transform stay row-oriented. n-D
input is accepted as numpy arrays only (lazy input must be 2-D; a model fitted on images
still transforms their flattened rows lazily).

Saving without pickle
---------------------
A saved model holds the network's ``state_dict`` (``weights.pt``, ``decoder.pt``) and,
in ``config.json``, the factory's importable name and the argument it was called with;
loading imports the factory, calls it and loads the state dict. A module passed directly
can be saved only when it was built by a named factory (:func:`build` records the name);
otherwise :meth:`~pumap_dask.ParametricUMAP.save` raises and asks for a factory name.

Reconstruction
--------------
With ``parametric_reconstruction=True`` a decoder is trained jointly with the encoder:
each optimiser step adds ``parametric_reconstruction_loss_weight`` times the
reconstruction loss of the step's head rows, decoded from their embedding. The target is
the *raw input* (not the encoder's centred / projected rows), so ``inverse_transform``
returns data in input units. The default decoder mirrors the encoder's hidden layers with
a linear output; for ``reconstruction_loss="mse"`` it predicts standardised rows
(``(x - mean) / scale``, the encoder's centring and global scale) and its loss is the mean
squared error in those units, so the weight does not depend on the data's scale; for
``"bce"`` (data in [0, 1]) it outputs logits and ``inverse_transform`` applies a sigmoid.
A custom decoder outputs input units (``"mse"``) or logits (``"bce"``). As in umap-learn,
``autoencoder_loss=False`` (default) trains the decoder on the detached embedding, so the
embedding is the one UMAP alone gives; True lets the reconstruction gradient reach the
encoder.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .errors import NetworkError
from .params import RECONSTRUCTION_LOSSES

logger = logging.getLogger(__name__)

FACTORY_ATTR = "_pumap_factory"
FACTORY_ARG_ATTR = "_pumap_factory_arg"
_FACTORY_HINT = ('pass an importable factory name such as "mypkg.nets:make_encoder" (a '
                 "module-level function called with the feature count, or the input's "
                 "trailing shape for n-D input, that returns the network)")


# --------------------------------------------------------------------------- factories
def import_factory(name: str) -> Callable[..., nn.Module]:
    """Import the factory named ``"package.module:function"`` (or ``"package.module.function"``).

    Parameters
    ----------
    name
        The factory's importable name; the part after ``:`` may be dotted
        (``"pkg.mod:Class.method"``).

    Returns
    -------
    callable

    Raises
    ------
    ImportError
        When the module cannot be imported or lacks the attribute.
    """
    if not isinstance(name, str) or not name:
        raise ImportError(f"a factory name must be a non-empty string, got {name!r}")
    if ":" in name:
        mod_name, _, attr = name.partition(":")
    else:
        mod_name, _, attr = name.rpartition(".")
    if not mod_name or not attr:
        raise ImportError(f"{name!r} is not a factory name of the form 'package.module:function'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:
        raise ImportError(f"cannot import module {mod_name!r} of factory {name!r} "
                          f"({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {mod_name!r} has no attribute {attr!r} (factory "
                              f"{name!r})") from None
    if not callable(obj):
        raise ImportError(f"factory {name!r} is not callable ({type(obj).__name__})")
    return obj


def factory_name(fn: Any) -> str | None:
    """The importable ``"module:qualname"`` of a callable, or None when it has none
    (lambdas, local functions, ``__main__``, or a name that imports something else)."""
    if isinstance(fn, str):
        return fn
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None)
    if not module or not qual or module == "__main__" or "<" in qual:
        return None
    name = f"{module}:{qual}"
    try:
        return name if import_factory(name) is fn else None
    except ImportError:
        return None


def _json_arg(arg: int | tuple) -> int | list[int]:
    return int(arg) if isinstance(arg, (int, np.integer)) else [int(a) for a in arg]


def _call_arg(arg: Any) -> int | tuple[int, ...]:
    return int(arg) if isinstance(arg, (int, np.integer)) else tuple(int(a) for a in arg)


def build(factory: str | Callable[..., nn.Module], arg: int | tuple[int, ...]) -> nn.Module:
    """Call a network factory and record its importable name on the module it returns.

    A module built this way can be passed as ``encoder=`` / ``decoder=`` and still be
    saved (the model stores the factory name and ``arg``, never a pickle).

    Parameters
    ----------
    factory
        ``"package.module:function"`` or the function itself (module-level, importable).
    arg
        What the factory is called with: the feature count, or the input's trailing shape.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    NetworkError
        When the factory cannot be imported or does not return a ``torch.nn.Module``.
    """
    if isinstance(factory, str):
        try:
            fn = import_factory(factory)
        except ImportError as exc:
            raise NetworkError(f"cannot use network factory {factory!r}: {exc}") from None
    else:
        fn = factory
    arg = _call_arg(arg)
    net = fn(arg)
    if not isinstance(net, nn.Module):
        raise NetworkError(f"network factory {factory_name(fn) or fn!r} returned a "
                           f"{type(net).__name__}, not a torch.nn.Module")
    name = factory_name(fn)
    if name is not None:
        setattr(net, FACTORY_ATTR, name)
        setattr(net, FACTORY_ARG_ATTR, _json_arg(arg))
    return net


def network_arg(input_shape: tuple[int, ...]) -> int | tuple[int, ...]:
    """What a factory is called with: the feature count for 2-D input, else the shape."""
    return int(input_shape[0]) if len(input_shape) == 1 else tuple(int(s) for s in input_shape)


def _make(spec: Any, arg: int | tuple, seed: int | None, what: str) -> nn.Module:
    """A private copy of a module, or a module built by a factory (seeded)."""
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)  # never train the user's parameter in place
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if seed is not None else torch.seed())
        try:
            return build(spec, arg)
        except NetworkError as exc:
            raise NetworkError(f"{what}: {exc}") from None


def _describe(net: nn.Module) -> tuple[str | None, Any]:
    return getattr(net, FACTORY_ATTR, None), getattr(net, FACTORY_ARG_ATTR, None)


# --------------------------------------------------------------------------- wrappers
class _Unflatten(nn.Module):
    """Rows (batch, prod(shape)) -> the user's network on (batch, *shape) -> flat output."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x.reshape(x.shape[0], *self.shape))
        return out.reshape(out.shape[0], -1)


class CustomEncoder(nn.Module):
    """A user's encoder behind the interface of :class:`pumap_dask.model.Encoder`.

    Training and transform pass flat float32 rows; ``mlp`` (the trained part, as on the
    default encoder) reshapes them to ``input_shape`` for the user's network. There is no
    fixed preprocessing: the network sees the input as given.
    """

    def __init__(self, net: nn.Module, input_shape: tuple[int, ...], n_components: int) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_features = int(math.prod(self.input_shape))
        self.n_components = int(n_components)
        self.mlp = _Unflatten(net, self.input_shape)

    @property
    def net(self) -> nn.Module:
        return self.mlp.net

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def spec(self) -> dict[str, Any]:
        """The ``encoder`` block of ``config.json`` (needs a named factory)."""
        name, arg = _describe(self.net)
        if name is None:
            raise NetworkError("cannot save a custom encoder given as a module instance "
                               "without a factory name (saving never pickles code): "
                               + _FACTORY_HINT + "; or build the module with "
                               "pumap_dask.networks.build(name, n_features)")
        return {"n_features": self.n_features, "n_components": self.n_components,
                "input_shape": list(self.input_shape), "factory": name, "factory_arg": arg}


class Decoder(nn.Module):
    """Embedding -> input rows. ``forward`` returns input units (flat rows).

    ``net`` maps (batch, n_components) to (batch, *input_shape) or (batch, n_features).
    For ``loss="mse"`` its output is scaled by ``scale`` and shifted by ``center``
    (buffers; the default decoder sets them to the training data's mean and global scale,
    a custom decoder keeps 0 and 1); for ``"bce"`` it outputs logits.
    """

    def __init__(self, net: nn.Module, n_components: int, input_shape: tuple[int, ...],
                 loss: str = "mse", hidden_layers: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if loss not in RECONSTRUCTION_LOSSES:
            raise NetworkError(f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, "
                               f"got {loss!r}")
        self.net = net
        self.n_components = int(n_components)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_features = int(math.prod(self.input_shape))
        self.loss = loss
        self.hidden_layers = None if hidden_layers is None else tuple(hidden_layers)
        self.register_buffer("center", torch.zeros(self.n_features))
        self.register_buffer("scale", torch.ones(()))

    def raw(self, z: torch.Tensor) -> torch.Tensor:
        """The network's flat output: standardised rows (mse) or logits (bce)."""
        out = self.net(z)
        return out.reshape(out.shape[0], -1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        r = self.raw(z)
        if self.loss == "bce":
            return torch.sigmoid(r)
        return r * self.scale + self.center

    def reconstruction_loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean loss of reconstructing flat raw rows ``x`` from embeddings ``z``."""
        r = self.raw(z)
        if r.shape != x.shape:
            raise NetworkError(f"the decoder outputs {tuple(r.shape[1:])} values per row, "
                               f"the input has {tuple(x.shape[1:])}")
        if self.loss == "bce":
            return nn.functional.binary_cross_entropy_with_logits(r, x)
        return ((r - (x - self.center) / self.scale) ** 2).mean()

    def spec(self) -> dict[str, Any]:
        """The ``decoder`` block of ``config.json``."""
        doc: dict[str, Any] = {"n_features": self.n_features, "n_components": self.n_components,
                               "input_shape": list(self.input_shape), "loss": self.loss}
        if self.hidden_layers is not None:
            doc["hidden_layers"] = list(self.hidden_layers)
            return doc
        name, arg = _describe(self.net)
        if name is None:
            raise NetworkError("cannot save a custom decoder given as a module instance "
                               "without a factory name (saving never pickles code): "
                               + _FACTORY_HINT.replace("make_encoder", "make_decoder"))
        doc.update(factory=name, factory_arg=arg)
        return doc


def default_decoder_net(n_components: int, n_features: int, hidden_layers: tuple[int, ...],
                        negative_slope: float = 0.1) -> nn.Sequential:
    """The encoder's MLP mirrored: hidden layers reversed, LeakyReLU, linear output."""
    layers: list[nn.Module] = []
    width = n_components
    for h in reversed(tuple(hidden_layers)):
        layers += [nn.Linear(width, int(h)), nn.LeakyReLU(negative_slope, inplace=True)]
        width = int(h)
    layers.append(nn.Linear(width, n_features))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- input shape


# --------------------------------------------------------------------------- building
def _check_output(net: nn.Module, in_shape: tuple[int, ...], out_size: int, what: str,
                  hint: str) -> None:
    """Run a 2-row dummy batch through ``net`` and check its output size per row."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros((2, *in_shape)))
    except Exception as exc:
        raise NetworkError(f"the {what} failed on a batch of shape {(2, *in_shape)} "
                           f"({type(exc).__name__}: {exc}); {hint}") from exc
    finally:
        net.train(was)
    if not isinstance(out, torch.Tensor) or out.shape[0] != 2 or out[0].numel() != out_size:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NetworkError(f"the {what} maps a batch of shape {(2, *in_shape)} to {got}; "
                           f"expected {out_size} values per row; {hint}")


def build_custom_encoder(spec: Any, input_shape: tuple[int, ...], n_components: int,
                         seed: int | None = None) -> CustomEncoder:
    """A :class:`CustomEncoder` from a module, factory or factory name (see module doc)."""
    net = _make(spec, network_arg(input_shape), seed, "encoder")
    _check_output(net, tuple(input_shape), n_components, "encoder",
                  f"it must map (batch, *{tuple(input_shape)}) to (batch, {n_components}) "
                  "(n_components)")
    return CustomEncoder(net, input_shape, n_components)


def build_decoder(spec: Any, input_shape: tuple[int, ...], n_components: int, loss: str,
                  hidden_layers: tuple[int, ...], X: np.ndarray | None = None,
                  seed: int | None = None) -> Decoder:
    """The decoder: ``spec`` (module, factory, name) or, for None, the mirrored MLP.

    The default decoder's centre and scale are set from ``X`` (raw training rows) for the
    mse loss.
    """
    n_features = int(math.prod(input_shape))
    if spec is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed if seed is not None else torch.seed()) + 1)
            dec = Decoder(default_decoder_net(n_components, n_features, hidden_layers),
                          n_components, input_shape, loss, hidden_layers=tuple(hidden_layers))
        if X is not None and loss == "mse":
            sample = np.asarray(X[:20000], dtype=np.float64)
            mean = sample.mean(0)
            rms = max(float(np.sqrt(((sample - mean) ** 2).mean())), 1e-12)
            dec.center.copy_(torch.as_tensor(mean, dtype=torch.float32))
            dec.scale.fill_(rms)
        return dec
    net = _make(spec, network_arg(input_shape), seed, "decoder")
    _check_output(net, (n_components,), n_features, "decoder",
                  f"it must map (batch, {n_components}) to (batch, *{tuple(input_shape)})")
    return Decoder(net, n_components, input_shape, loss)


def allowed_factory(name: str, factories: Mapping[str, Callable] | None) -> Callable:
    """The factory a saved model names, taken only from ``factories`` (what the caller
    passed): a model file is data and never makes this package import or call code.

    Raises
    ------
    NetworkError
        When ``name`` is not among ``factories`` (the message says how to allow it).
    """
    fn = (factories or {}).get(name)
    if fn is None or not callable(fn):
        raise NetworkError(
            f"is built by the custom network factory {name!r}, and a model file never "
            "runs code it names: pass it when loading, "
            f"pumap_dask.load(path, networks={{{name!r}: the_factory}}) (command line: "
            f"--allow-network {name})")
    return fn


def factories_by_name(names: Iterable[str]) -> dict[str, Callable]:
    """Import the named factories the user allows (CLI ``--allow-network NAME``)."""
    return {name: import_factory(name) for name in names}


def encoder_from_spec(spec: dict[str, Any],
                      factories: Mapping[str, Callable] | None = None) -> CustomEncoder:
    """Rebuild (untrained) the custom encoder a config's ``encoder`` block describes, with
    its factory taken from ``factories`` (see :func:`allowed_factory`).

    Raises
    ------
    NetworkError
        When the factory is not allowed, or builds no fitting module.
    """
    fn = allowed_factory(spec["factory"], factories)
    net = build(fn, _call_arg(spec["factory_arg"]))
    setattr(net, FACTORY_ATTR, spec["factory"])
    setattr(net, FACTORY_ARG_ATTR, spec["factory_arg"])
    return CustomEncoder(net, tuple(spec["input_shape"]), spec["n_components"])


def decoder_from_spec(spec: dict[str, Any],
                      factories: Mapping[str, Callable] | None = None) -> Decoder:
    """Rebuild (untrained) the decoder a config's ``decoder`` block describes (a custom
    one's factory taken from ``factories``, see :func:`allowed_factory`)."""
    shape = tuple(spec["input_shape"])
    if "factory" not in spec:
        net = default_decoder_net(spec["n_components"], spec["n_features"],
                                  tuple(spec["hidden_layers"]))
        return Decoder(net, spec["n_components"], shape, spec.get("loss", "mse"),
                       hidden_layers=tuple(spec["hidden_layers"]))
    fn = allowed_factory(spec["factory"], factories)
    net = build(fn, _call_arg(spec["factory_arg"]))
    setattr(net, FACTORY_ATTR, spec["factory"])
    setattr(net, FACTORY_ARG_ATTR, spec["factory_arg"])
    return Decoder(net, spec["n_components"], shape, spec.get("loss", "mse"))


# --------------------------------------------------------------------------- training term


# --------------------------------------------------------------------------- inverse_transform
_DECODERS: dict[str, Decoder] = {}


# --------------------------------------------------------------------------- fit wiring


