"""The interface of the training engines and the batch loop they share.

An engine runs epochs of mini-batch updates for a
:class:`~onnxfit.engines.problem.TrainingProblem` and owns the weights and
update-rule state while it trains (as buffers that onnxruntime reads and
writes in place).  The estimator hands state in with
:meth:`BaseEngine.set_state` and takes it back with
:meth:`BaseEngine.get_state`; everything else about a run (epochs, the
schedule, early stopping) stays in the estimator.
"""

import math

import numpy as np

from ..sessions import CPU
from .buffers import BatchBuffers, EngineMemory, WeightSet
from .problem import FLAT_WEIGHTS, flat_state_name, updated_name


def _not_finite(loss):
    return not math.isfinite(loss)


class BaseEngine:
    """Interface of the training engines.

    Parameters
    ----------
    problem : TrainingProblem
    """

    def __init__(self, problem, memory=None):
        self.problem = problem
        self.device = problem.device or CPU
        self.memory = memory or EngineMemory(self.device)
        self._buffers = {}
        # Two sets of weights/state buffers: a step reads set ``_parity`` and
        # writes the other one.  Writing in place would be wrong, since
        # onnxruntime may update a weight before a backward node that still
        # reads the old value.
        self._sets = [WeightSet(problem, self.memory), WeightSet(problem, self.memory)]
        self._parity = 0
        # What the last epoch saw (see run_epoch).
        self.last_step_loss = None
        self.diverged_at = None

    def set_state(self, weights, states, statistics=None):
        """Copy weights, update-rule state and running statistics into the
        engine.

        Parameters
        ----------
        weights : dict of str -> ndarray
        states : dict of str -> dict of str -> ndarray
            ``states[weight][state_name]``.
        statistics : dict of str -> ndarray, optional
            Running statistics (``TrainingProblem.statistics``).
        """
        problem, memory, current = self.problem, self.memory, self._sets[0]
        for name, tensor in current.statistics.items():
            memory.write(tensor, statistics[name])
        # The flat vectors are made whole on the host, then written at once
        # (a device allocation is written whole, not view by view).
        offsets = problem.weight_offsets()
        for key, state in [(FLAT_WEIGHTS, None)] + [
                (flat_state_name(s), s) for s in problem.state_names]:
            flat = np.empty(problem.n_weights, dtype=problem.dtype)
            for weight, (start, stop) in offsets.items():
                value = weights[weight] if state is None else states[weight][state]
                flat[start:stop] = np.asarray(value).reshape(-1)
            memory.write(current.flat[key], flat)
        self._parity = 0

    def get_state(self):
        """Copies of the current weights, update-rule state and running
        statistics."""
        problem, current = self.problem, self._sets[self._parity]
        offsets = problem.weight_offsets()
        flats = {key: self.memory.read(flat) for key, flat in current.flat.items()}

        def unflatten(key, weight):
            start, stop = offsets[weight]
            return flats[key][start:stop].reshape(problem.weight_shapes[weight]).copy()

        weights = {w: unflatten(FLAT_WEIGHTS, w) for w in problem.weight_names}
        states = {
            w: {s: unflatten(flat_state_name(s), w) for s in problem.state_names}
            for w in problem.weight_names
        }
        statistics = {n: self.memory.read(a) for n, a in current.statistics.items()}
        return weights, states, statistics

    def _bind_statistics(self, binding, parity):
        """Bind the running statistics read from set ``parity``, and their
        new values, written to the other set."""
        for name, new in self.problem.statistics.items():
            self.memory.bind_input(binding, name, self._sets[parity].statistics[name])
            self.memory.bind_output(binding, new, self._sets[1 - parity].statistics[name])

    def _bind_update_rule(self, binding, parity):
        """Bind what the update rule reads from set ``parity`` and writes to
        the other set."""
        for name, array in self._sets[parity].flat.items():
            self.memory.bind_input(binding, name, array)
        for name, array in self._sets[1 - parity].flat.items():
            self.memory.bind_output(binding, updated_name(name), array)

    def run_epoch(self, inputs, label, sample_weight, order, batch_size, rates, rng=None,
                  guard=None, on_step=None):
        """Run one pass of mini-batch updates.

        Parameters
        ----------
        inputs : dict of str -> ndarray
            One C-contiguous array ``(n_samples, *shape)`` per data input of
            the problem, in its dtype.
        label : ndarray of shape (n_samples,) + label_shape, or of integers
            Labels in the problem's dtype, or, for one-hot labels, the
            position of each sample's 1 in its flattened label (an integer
            array of shape (n_samples,)): the one-hot rows are then made
            batch by batch, never for the whole data.
        sample_weight : ndarray of shape (n_samples,) or None
            None means uniform weights.
        order : ndarray of int
            Sample indices in the order of this epoch.
        batch_size : int
        rates : ndarray of shape (n_steps,)
            Learning rate of each update (see :meth:`n_steps`).
        rng : numpy.random.RandomState or Generator, optional
            Draws the Dropout masks (needed when the problem has masks; a
            RandomState seeds one Generator per epoch).
        guard : onnxfit.divergence.DivergenceGuard, optional
            The epoch stops after the first step whose loss the guard calls
            a divergence (without one, a non-finite loss): ``diverged_at``
            then holds that step's index in the epoch.
        on_step : callable, optional
            Called as ``on_step(step, loss)`` after each update (a progress
            bar).

        Returns
        -------
        float
            Mean loss (penalty included) over the samples of the steps run.
            The last step's loss is in ``last_step_loss`` afterwards.
        """
        n = len(order)
        n_full, remainder = divmod(n, batch_size)
        # Full batches, then the last, partial one: one set of buffers each,
        # looked up once, so that a step is a gather, a rate and a run.
        if self._joins_last_batch(n, batch_size):
            spans = [(batch_size, 0, n_full - 1), (batch_size + remainder, n_full - 1, n_full)]
        else:
            spans = [(batch_size, 0, n_full), (remainder, n_full, n_full + 1)]
        rates = np.asarray(rates).tolist()
        rate, loss, step_fn = self._rate, self._step_loss, self._step
        masked = bool(self.problem.masks)
        if masked:
            if rng is None:
                raise ValueError("The problem has Dropout masks: run_epoch needs an rng.")
            # One Generator an epoch, seeded from rng: reproducible, and it
            # fills the masks' scratch buffers without allocating.
            if not isinstance(rng, np.random.Generator):
                rng = np.random.default_rng(rng.randint(0, 2**63 - 1, dtype=np.int64))
        diverged = guard.diverged if guard is not None else _not_finite
        self.diverged_at = None
        total, seen = 0.0, 0
        for size, first, last in spans:
            if size == 0 or first == last:
                continue
            buffers = self._batch_buffers(size)
            gather = buffers.gather
            parity = self._parity
            for step in range(first, last):
                start = step * batch_size
                gather(inputs, label, sample_weight, order[start:start + size])
                if masked:
                    buffers.draw_masks(rng)
                rate[()] = rates[step]
                step_fn(buffers, parity)
                # Kept current at every step: an interrupted epoch still
                # hands back the last weights written.
                self._parity = parity = parity ^ 1
                value = float(loss)
                self.last_step_loss = value
                total += value * size
                seen += size
                if on_step is not None:
                    on_step(step, value)
                if diverged(value):
                    self.diverged_at = step
                    return total / seen
        return total / seen

    def _joins_last_batch(self, n, batch_size):
        """Whether the remainder of ``n`` samples joins the last full batch.

        It does when the graph normalises with batch statistics and the
        remainder is under half a batch (or a single sample): a handful of samples give
        BatchNormalization statistics so noisy that one step can undo an
        epoch (a remainder of 3 gave a gradient ten times the usual on a
        Conv net of the digits).  Every sample is still used once an epoch.
        """
        remainder = n % batch_size
        return bool(self.problem.statistics) and n >= batch_size and 0 < remainder < max(
            2, (batch_size + 1) // 2)

    def n_steps(self, n, batch_size):
        """Updates an epoch of ``n`` samples takes (see :meth:`run_epoch`)."""
        steps = -(-n // batch_size)
        return steps - 1 if self._joins_last_batch(n, batch_size) else steps

    def graphs(self):
        """The ONNX graphs this engine runs, by name (copies)."""
        raise NotImplementedError

    def _step(self, buffers, parity):
        """One update on the gathered batch: read weight set ``parity``,
        write the other one, and the objective into ``_step_loss``."""
        raise NotImplementedError

    def _batch_buffers(self, size):
        """Bound buffers for batches of ``size`` rows (built on first use).

        An epoch needs two sizes at most (the batch size and the last,
        partial batch); partial_fit calls on chunks of varying length bring
        new remainders, so only the two most recently used sizes are kept.
        """
        buffers = self._buffers.pop(size, None)
        if buffers is None:
            buffers = BatchBuffers(self.problem, size)
            buffers.allocate()
            self._bind_batch(buffers)
            while len(self._buffers) >= 2:
                del self._buffers[next(iter(self._buffers))]
        self._buffers[size] = buffers  # most recently used last
        return buffers

    def _bind_batch(self, buffers):
        """Bind new batch buffers to the engine's sessions."""
        raise NotImplementedError
