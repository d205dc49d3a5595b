"""The memory an engine trains in: batch buffers and flat weight vectors.

Batches are gathered into fixed buffers (:class:`BatchBuffers`) and weights
and update-rule state live in flat vectors (:class:`WeightSet`), all bound to
onnxruntime through IO binding, which shares their memory: no copy of the
data set per epoch, no allocation per step.
"""

import numpy as np

from ..sessions import bind_output_array
from .problem import FLAT_WEIGHTS, flat_state_name, state_value_name


class BatchBuffers:
    """Fixed, pre-allocated buffers for one batch size.

    Each shuffled batch is gathered into the same memory
    (``np.take(..., out=...)``), which onnxruntime reads through IO binding:
    no copy of the whole data set per epoch, no allocation per step.

    Attributes
    ----------
    size : int
    inputs : dict of str -> ndarray
        The gathered batch of each graph input fed from the data.
    label, sample_weight : ndarray
        The gathered labels and sample weights (see :meth:`gather`).
    masks : dict of str -> ndarray
        The Dropout masks, drawn anew at each step (see :meth:`draw_masks`).
    bound : object
        What the engine bound to these buffers (its sessions' IO bindings
        and its own per-batch buffers), set by the engine.
    """

    def __init__(self, problem, batch_size):
        self.size = batch_size
        self.problem = problem
        self.inputs = None
        self.masks = None
        self.label = None
        self.sample_weight = None
        self.bound = None

    def allocate(self):
        """Allocate the buffers."""
        problem = self.problem
        self.inputs = {
            spec.name: np.zeros((self.size,) + tuple(spec.shape), dtype=spec.dtype)
            for spec in problem.inputs
        }
        self.masks = {
            mask.name: np.ones(mask.shape_for(self.size), dtype=mask.dtype)
            for mask in problem.masks
        }
        self._mask_specs = list(problem.masks)
        # Scratch memory of the draws (see DropoutMask.draw).
        self._uniform = {
            mask.name: np.empty(mask.shape_for(self.size),
                                dtype=np.float32 if mask.dtype == np.float32 else np.float64)
            for mask in problem.masks
        }
        self._keep = {mask.name: np.empty(mask.shape_for(self.size), dtype=bool)
                      for mask in problem.masks}
        self.label = np.empty((self.size,) + tuple(problem.label_shape), dtype=problem.dtype)
        # The losses take the weights divided by the batch size and shaped to
        # broadcast against the prediction (see onnxfit.losses).
        self.sample_weight = np.full(
            (self.size,) + (1,) * len(problem.label_shape), 1.0 / self.size, dtype=problem.dtype
        )
        self._weight_column = self.sample_weight.reshape(self.size)  # a view
        self.uniform_weights = True
        self._one_hot_rows = None  # made when labels come as column indices
        self._label_index = None

    def gather(self, inputs, label, sample_weight, indices):
        """Copy the rows ``indices`` into the buffers.

        ``inputs`` holds one array per graph input (as :attr:`inputs`);
        ``sample_weight=None`` means uniform weights: the buffer keeps
        ``1 / batch_size`` instead of being gathered at every step.
        """
        # mode="clip" avoids numpy's extra buffering of mode="raise" (the
        # indices come from a permutation, so they are always in range); the
        # ndarray method skips np.take's Python wrapper, which costs about as
        # much as gathering a small batch.
        for name, values in inputs.items():
            values.take(indices, axis=0, out=self.inputs[name], mode="clip")
        if label.dtype.kind in "iu":  # column indices of one-hot labels
            if self._label_index is None or self._label_index.dtype != label.dtype:
                self._label_index = np.empty(self.size, dtype=label.dtype)
                shape = tuple(self.problem.label_shape)
                width = int(np.prod(shape))
                self._one_hot_rows = np.eye(width, dtype=self.problem.dtype).reshape(
                    (width,) + shape)
            label.take(indices, axis=0, out=self._label_index, mode="clip")
            self._one_hot_rows.take(self._label_index, axis=0, out=self.label, mode="clip")
        else:
            label.take(indices, axis=0, out=self.label, mode="clip")
        column = self._weight_column
        if sample_weight is None:
            if not self.uniform_weights:
                column.fill(1.0 / self.size)
                self.uniform_weights = True
        else:
            sample_weight.take(indices, axis=0, out=column, mode="clip")
            column *= 1.0 / self.size
            self.uniform_weights = False

    def draw_masks(self, rng):
        """Draw a new Dropout mask into each mask buffer (``rng``: a
        ``numpy.random.Generator``, which draws without allocating)."""
        for mask in self._mask_specs:
            name = mask.name
            mask.draw(rng, self.masks[name], self._uniform[name], self._keep[name])


class WeightSet:
    """The weights and the update-rule state of a model, each a flat vector.

    The update rule reads and writes flat vectors
    (:func:`onnxfit.engines.steps.append_update`); the model reads each
    weight as its own tensor, a view into the flat vector (no copy:
    onnxruntime reads the same memory).

    Parameters
    ----------
    problem : TrainingProblem
    memory : EngineMemory

    Attributes
    ----------
    flat : dict
        ``FLAT_WEIGHTS`` and each ``flat_state_name(s)`` -> 1-D array.
    views : dict
        Each weight name and ``state_value_name(weight, s)`` -> view of the
        weight's shape into the flat vectors.
    statistics : dict
        Each running statistic (see ``TrainingProblem.statistics``) -> array.
    """

    def __init__(self, problem, memory):
        self.statistics = {
            name: memory.zeros(problem.statistic_shapes[name], problem.dtype)
            for name in problem.statistics
        }
        offsets = problem.weight_offsets()
        self.flat, self.views = {}, {}
        for key, state in [(FLAT_WEIGHTS, None)] + [
            (flat_state_name(s), s) for s in problem.state_names
        ]:
            flat = memory.zeros((problem.n_weights,), problem.dtype)
            self.flat[key] = flat
            for weight, (start, stop) in offsets.items():
                name = weight if state is None else state_value_name(weight, state)
                self.views[name] = memory.view(flat, start, stop, problem.weight_shapes[weight])


class DeviceArray:
    """A tensor (or a contiguous part of one) in an ``OrtValue``'s memory.

    Engines on a GPU keep weights, update state and the values passed
    between graphs in device memory; a weight is a view into the flat
    vector, bound to onnxruntime by address (``IOBinding.bind_input`` with
    a buffer pointer), as numpy views are on the CPU.

    Parameters
    ----------
    ortvalue : onnxruntime.OrtValue
        The allocation (kept alive by every view of it).
    dtype : numpy dtype
    shape : tuple
    offset : int, default=0
        Position of the first element in the allocation, in elements.
    """

    def __init__(self, ortvalue, dtype, shape, offset=0):
        self.ortvalue = ortvalue
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.offset = int(offset)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def address(self):
        return self.ortvalue.data_ptr() + self.offset * self.dtype.itemsize

    def view(self, start, stop, shape):
        """Elements ``start:stop`` of this flat array, shaped ``shape``."""
        return DeviceArray(self.ortvalue, self.dtype, shape, self.offset + start)


class EngineMemory:
    """Where an engine keeps its tensors, and how it binds them.

    On the CPU (the default), numpy arrays that onnxruntime reads and writes
    in place.  On a GPU, :class:`DeviceArray` views into ``OrtValue``
    allocations on the device: weights, update state, running statistics
    and the values passed between graphs never leave it; each batch is
    copied there as the step's input, and only the scalar loss comes back.
    ``ortvalues=True`` uses device-style memory on the CPU as well (tests
    run the GPU code path that way).

    Parameters
    ----------
    device : onnxfit.sessions.Device
    ortvalues : bool or None, default=None
        None: OrtValues on a GPU, numpy arrays on the CPU.
    """

    def __init__(self, device, ortvalues=None):
        self.device = device
        self.ortvalues = device.type != "cpu" if ortvalues is None else bool(ortvalues)

    def zeros(self, shape, dtype):
        """A new zero-filled tensor."""
        if not self.ortvalues:
            return np.zeros(shape, dtype=dtype)
        from onnxruntime import OrtValue

        value = OrtValue.ortvalue_from_numpy(
            np.zeros(shape, dtype=dtype), self.device.type, self.device.id)
        return DeviceArray(value, dtype, shape)

    def view(self, flat, start, stop, shape):
        """Elements ``start:stop`` of the flat tensor ``flat``, shaped ``shape``."""
        if isinstance(flat, DeviceArray):
            return flat.view(start, stop, shape)
        return flat[start:stop].reshape(shape)

    @staticmethod
    def read(tensor):
        """A numpy copy of ``tensor``."""
        if isinstance(tensor, DeviceArray):
            whole = tensor.ortvalue.numpy().reshape(-1)
            return whole[tensor.offset:tensor.offset + tensor.size].reshape(tensor.shape).copy()
        return tensor.copy()

    @staticmethod
    def write(tensor, array):
        """Copy ``array`` into the whole allocation ``tensor`` (not a view)."""
        if isinstance(tensor, DeviceArray):
            tensor.ortvalue.update_inplace(
                np.ascontiguousarray(array, dtype=tensor.dtype).reshape(tensor.shape))
        else:
            np.copyto(tensor, array, casting="same_kind")

    def bind_input(self, binding, name, tensor):
        if isinstance(tensor, DeviceArray):
            binding.bind_input(name, self.device.type, self.device.id, tensor.dtype,
                               list(tensor.shape), tensor.address)
        else:
            binding.bind_cpu_input(name, tensor)

    def bind_output(self, binding, name, tensor):
        if isinstance(tensor, DeviceArray):
            binding.bind_output(name, self.device.type, self.device.id, tensor.dtype,
                                list(tensor.shape), tensor.address)
        else:
            bind_output_array(binding, name, tensor)

    def bind_allocated_output(self, binding, name):
        """Let onnxruntime allocate output ``name`` on the device at each run."""
        binding.bind_output(name, self.device.type, self.device.id)
