"""Weight snapshots: the flat-vector layout contract, capture during training, and which
evaluations become the snapshots (20 of n). The parts of the vector slices are cut from:
`nws.net.regions`.

The layout contract (reference section 6), written down once here:

* All weights of the net except optimizer state, layer by layer in creation order.
* Per conv or hidden dense layer: kernel, bias, then (with batch norm) beta, gamma, moving mean,
  moving variance. The output layer: kernel, bias.
* A conv kernel of Keras shape [k, k, in, out] is stored transposed to [out, in, k, k] and
  flattened in row-major order; a dense kernel [in, out] is stored as [out, in]. Consecutive values
  are therefore the incoming weights of one neuron, and position follows depth.
* The conv part (all conv layers) comes first, then the fc part (hidden dense + output layer);
  `weightn_conv` and `weightn_fc` are their lengths.

Our artifacts store float32 (the NWS export writes float64).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nws.net.cnn import LayerSpec, layer_plan
from nws.space import NetConfig

LAYOUT_FORMAT = "nws-flat-v1"
BN_TENSORS = ("beta", "gamma", "moving_mean", "moving_variance")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of the net lives in the flat vector."""

    layer: str  # the weight-owning layer (conv1_1, fc2, fc_final)
    tensor: str  # kernel, bias, beta, gamma, moving_mean, moving_variance
    keras_layer: str  # the Keras layer holding it (conv1_1 or conv1_1_bn)
    shape: tuple[int, ...]  # the tensor's Keras shape
    stored_shape: tuple[int, ...]  # the shape it is flattened from (kernels transposed)
    offset: int
    size: int
    part: str  # "conv" or "fc"

    @property
    def stop(self) -> int:
        return self.offset + self.size

    @property
    def is_kernel(self) -> bool:
        return self.tensor == "kernel"

    def in_region(self, region: str) -> bool:
        """Whether this tensor belongs to `region` (one of `nws.net.regions.REGIONS`)."""
        if region == "nonkernel":
            return not self.is_kernel
        return region == "all" or self.part == region

    def to_storage(self, value: np.ndarray) -> np.ndarray:
        """A Keras-shaped tensor in storage order, flat."""
        if self.is_kernel:
            value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
        return np.ravel(value)

    def from_storage(self, flat: np.ndarray) -> np.ndarray:
        """The Keras-shaped tensor from its slice of the flat vector."""
        value = np.reshape(flat, self.stored_shape)
        if self.is_kernel:
            value = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T
        return value


@dataclass(frozen=True)
class WeightLayout:
    """The layout of a net's flat weight vector."""

    entries: tuple[TensorEntry, ...]

    @property
    def n_weights(self) -> int:
        return self.entries[-1].stop if self.entries else 0

    @property
    def weightn_conv(self) -> int:
        return sum(e.size for e in self.entries if e.part == "conv")

    @property
    def weightn_fc(self) -> int:
        return sum(e.size for e in self.entries if e.part == "fc")

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries)

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.entries]

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> WeightLayout:
        return cls(
            tuple(
                TensorEntry(
                    **{
                        **r,
                        "shape": tuple(r["shape"]),
                        "stored_shape": tuple(r["stored_shape"]),
                    }
                )
                for r in records
            )
        )


def _layer_tensors(spec: LayerSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(tensor, keras layer, shape) of one weight-owning layer, in layout order."""
    tensors = [("kernel", spec.name, spec.kernel_shape), ("bias", spec.name, (spec.units,))]
    if spec.batch_norm:
        tensors += [(t, f"{spec.name}_bn", (spec.units,)) for t in BN_TENSORS]
    return tensors


def weight_layout(config: NetConfig) -> WeightLayout:
    """The layout of a configuration's flat vector, computed without building the model."""
    entries: list[TensorEntry] = []
    offset = 0
    for spec in layer_plan(config):
        for tensor, keras_layer, shape in _layer_tensors(spec):
            if tensor == "kernel":
                stored = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
            else:
                stored = shape
            size = int(np.prod(shape))
            entries.append(
                TensorEntry(spec.name, tensor, keras_layer, shape, stored, offset, size, spec.part)
            )
            offset += size
    return WeightLayout(tuple(entries))


@functools.lru_cache(maxsize=1)
def _architectures_by_length() -> dict[int, NetConfig]:
    """n_weights -> a configuration of that architecture, for every architecture of the space.
    Lengths are unique within batch norm on and within off; the two lengths the settings share go
    to batch norm on (the only setting the study draws)."""
    import itertools

    from nws.space import BY_NAME

    configs: dict[int, NetConfig] = {}
    arch = [BY_NAME[n].options for n in ("filter_size", "depth_conv", "depth_fc", "width_conv", "width_fc")]
    for batch_norm in ("off", "on"):
        for k, dc, df, wc, wf in itertools.product(*arch):
            config = NetConfig("mnist", 0.001, 32, batch_norm, "off", "adam", "relu", "normal",
                               k, dc, df, wc, wf)  # fmt: skip
            configs[weight_layout(config).n_weights] = config
    return configs


def architectures() -> list[NetConfig]:
    """A configuration of every architecture of the space (batch norm on and off)."""
    return list(_architectures_by_length().values())


def architecture_for_length(n_weights: int) -> NetConfig:
    """A configuration with the architecture (and batch norm) of a flat vector of the NWS family
    of this length, which names it uniquely; its other properties are placeholders."""
    try:
        return _architectures_by_length()[n_weights]
    except KeyError:
        raise ValueError(f"no architecture of the NWS space has {n_weights} weights") from None


@functools.cache
def conv_size_for_length(n_weights: int) -> int:
    """The conv part's length of a flat vector of the NWS family, known from its length alone."""
    return layout_for_length(n_weights).weightn_conv


@functools.cache
def layout_for_length(n_weights: int) -> WeightLayout:
    """The layout of a flat vector of the NWS family, known from its length alone."""
    return weight_layout(architecture_for_length(n_weights))


def vector_layout(n_weights: int, layout: WeightLayout | None = None) -> WeightLayout:
    """The layout of a flat vector of this length: `layout` where it fits (an imported zoo's
    architecture), else the NWS family's; ValueError if neither has this length."""
    if layout is not None and layout.n_weights == n_weights:
        return layout
    return layout_for_length(n_weights)


def _variable(model: Any, entry: TensorEntry) -> Any:
    return getattr(model.get_layer(entry.keras_layer), entry.tensor)


def flatten(model: Any, layout: WeightLayout) -> np.ndarray:
    """The flat float32 vector of a Keras model built by `nws.net.cnn.build_model`."""
    out = np.empty(layout.n_weights, dtype=np.float32)
    for entry in layout:
        value = np.asarray(_variable(model, entry).numpy(), dtype=np.float32)
        out[entry.offset : entry.stop] = entry.to_storage(value)
    return out


def unflatten(vector: np.ndarray, layout: WeightLayout) -> dict[tuple[str, str], np.ndarray]:
    """Keras-shaped tensors keyed by (keras layer, tensor) from a flat vector."""
    vector = np.asarray(vector)
    if vector.shape != (layout.n_weights,):
        raise ValueError(f"expected a flat vector of {layout.n_weights} values, got {vector.shape}")
    return {(e.keras_layer, e.tensor): e.from_storage(vector[e.offset : e.stop]) for e in layout.entries}


def load_into(model: Any, vector: np.ndarray, layout: WeightLayout) -> None:
    """Assign a flat vector to the model's variables (the inverse of `flatten`)."""
    tensors = unflatten(vector, layout)
    for entry in layout:
        variable = _variable(model, entry)
        variable.assign(tensors[(entry.keras_layer, entry.tensor)].astype(variable.dtype))


def _evenly_spaced(first: int, last: int, count: int) -> np.ndarray:
    """round(linspace(first, last, count)): how the study picks `count` of a net's evaluations
    (NumPy rounds halves to even, as the original code)."""
    return np.round(np.linspace(first, last, count)).astype(np.int64)


def select_prints(n_evals: int, prints: int) -> np.ndarray:
    """1-based indices of the evaluations kept: round(linspace(1, n, prints)), as the original.

    With fewer evaluations than prints, indices repeat.
    """
    if n_evals < 1:
        raise ValueError("no evaluations to select from")
    return _evenly_spaced(1, n_evals, prints)


def published_error_rows(n_evals: int, prints: int) -> np.ndarray:
    """The 0-based `error.bin` row of every snapshot of a published net, as the published reader
    computes it: round(linspace(0, n - 1, prints)) (reference section 7). Not `select_prints`
    minus one: at a half the two round apart (n = 4, prints = 3: rows 0, 2, 3 against
    evaluations 1, 2, 4)."""
    return _evenly_spaced(0, n_evals - 1, prints)


@dataclass
class SnapshotRecorder:
    """Writes one flat vector per evaluation to a temporary file on disk (not RAM).

    A net may run 1000 epochs; only the `prints` selected rows are ever read back.
    """

    layout: WeightLayout
    directory: str | None = None
    evaluations: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="nws-snapshots-", suffix=".f32", dir=self.directory)
        self._file = os.fdopen(fd, "w+b")
        try:  # POSIX: the open file outlives its name, and vanishes even if the process is killed
            os.unlink(path)
            self._path: str | None = None
        except OSError:  # Windows: removed in close()
            self._path = path

    def record(self, model: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        self._file.write(flatten(model, self.layout).tobytes())
        self.evaluations.append({"epoch": epoch, **{k: float(v) for k, v in metrics.items()}})

    @property
    def size(self) -> int:
        """Bytes recorded so far."""
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def select(self, prints: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The [prints, n_weights] float32 array and, per row, its evaluation's record."""
        self._file.flush()
        n = len(self.evaluations)
        picks = select_prints(n, prints)
        stored = np.memmap(self._file, dtype=np.float32, mode="r", shape=(n, self.layout.n_weights))
        weights = np.array(stored[picks - 1])
        del stored
        rows = [{"snapshot": k + 1, **self.evaluations[i - 1]} for k, i in enumerate(picks)]
        return weights, rows

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._path is not None and os.path.exists(self._path):
            os.unlink(self._path)

    def __enter__(self) -> SnapshotRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layout_document(
    config: NetConfig, layout: WeightLayout, snapshots: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The content of `snapshots/layout.json`: enough to read a row of weights.npy unaided."""
    return {
        "format": LAYOUT_FORMAT,
        "dtype": "float32",
        "order": (
            "layers in creation order; per layer kernel, bias, then batch norm beta, gamma, "
            "moving_mean, moving_variance; conv kernels [k,k,in,out] stored as [out,in,k,k], "
            "dense kernels [in,out] as [out,in], row-major"
        ),
        "config": config.as_dict(),
        "n_weights": layout.n_weights,
        "weightn_conv": layout.weightn_conv,
        "weightn_fc": layout.weightn_fc,
        "conv_fc_boundary": layout.weightn_conv,
        "tensors": layout.to_records(),
        "snapshots": list(snapshots),
    }
