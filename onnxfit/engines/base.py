"""The interface of the training engines and the batch loop they share.

An engine runs epochs of mini-batch updates for a
:class:`~onnxfit.engines.problem.TrainingProblem` and owns the weights and
update-rule state while it trains (as buffers that onnxruntime reads and
writes in place).  The estimator hands state in with
:meth:`BaseEngine.set_state` and takes it back with
:meth:`BaseEngine.get_state`; everything else about a run (epochs, the
schedule, early stopping) stays in the estimator.
"""

import numpy as np

from ..sessions import bind_output_array
from .buffers import BatchBuffers, WeightSet
from .problem import state_value_name, updated_name


class BaseEngine:
    """Interface of the training engines.

    Parameters
    ----------
    problem : TrainingProblem
    """

    def __init__(self, problem):
        self.problem = problem
        self._buffers = {}
        # Two sets of weights/state buffers: a step reads set ``_parity`` and
        # writes the other one.  Writing in place would be wrong, since
        # onnxruntime may update a weight before a backward node that still
        # reads the old value.
        self._sets = [WeightSet(problem), WeightSet(problem)]
        self._parity = 0

    def set_state(self, weights, states):
        """Copy weights and update-rule state into the engine.

        Parameters
        ----------
        weights : dict of str -> ndarray
        states : dict of str -> dict of str -> ndarray
            ``states[weight][state_name]``.
        """
        current = self._sets[0].views
        for weight in self.problem.weight_names:
            np.copyto(current[weight], weights[weight], casting="same_kind")
            for state in self.problem.state_names:
                np.copyto(
                    current[state_value_name(weight, state)],
                    states[weight][state],
                    casting="same_kind",
                )
        self._parity = 0

    def get_state(self):
        """Copies of the current weights and update-rule state."""
        current = self._sets[self._parity].views
        weights = {w: current[w].copy() for w in self.problem.weight_names}
        states = {
            w: {s: current[state_value_name(w, s)].copy() for s in self.problem.state_names}
            for w in self.problem.weight_names
        }
        return weights, states

    def _bind_update_rule(self, binding, parity):
        """Bind what the update rule reads from set ``parity`` and writes to
        the other set."""
        for name, array in self._sets[parity].flat.items():
            binding.bind_cpu_input(name, array)
        for name, array in self._sets[1 - parity].flat.items():
            bind_output_array(binding, updated_name(name), array)

    def run_epoch(self, X, label, sample_weight, order, batch_size, rates):
        """Run one pass of mini-batch updates.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features), input dtype, C-contiguous
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
        rates : ndarray of shape (n_batches,)
            Learning rate of each update.

        Returns
        -------
        float
            Mean loss (penalty included) over the samples of the epoch.
        """
        n = len(order)
        n_features = X.shape[1]
        n_full = n // batch_size
        # Full batches, then the last, partial one: one set of buffers each,
        # looked up once, so that a step is a gather, a rate and a run.
        spans = [(batch_size, 0, n_full), (n - n_full * batch_size, n_full, n_full + 1)]
        rates = np.asarray(rates).tolist()
        rate, loss, step_fn = self._rate, self._step_loss, self._step
        total = 0.0
        for size, first, last in spans:
            if size == 0 or first == last:
                continue
            buffers = self._batch_buffers(size, n_features)
            gather = buffers.gather
            span_total = 0.0
            parity = self._parity
            for step in range(first, last):
                start = step * batch_size
                gather(X, label, sample_weight, order[start:start + size])
                rate[()] = rates[step]
                step_fn(buffers, parity)
                # Kept current at every step: an interrupted epoch still
                # hands back the last weights written.
                self._parity = parity = parity ^ 1
                span_total += float(loss)
            total += span_total * size
        return total / n

    def _step(self, buffers, parity):
        """One update on the gathered batch: read weight set ``parity``,
        write the other one, and the objective into ``_step_loss``."""
        raise NotImplementedError

    def _batch_buffers(self, size, n_features):
        """Bound buffers for batches of ``size`` rows (built on first use).

        An epoch needs two sizes at most (the batch size and the last,
        partial batch); partial_fit calls on chunks of varying length bring
        new remainders, so only the two most recently used sizes are kept.
        """
        buffers = self._buffers.pop(size, None)
        if buffers is None or buffers.X.shape[1] != n_features:
            buffers = BatchBuffers(self.problem, size)
            buffers.allocate(n_features)
            self._bind_batch(buffers)
            while len(self._buffers) >= 2:
                del self._buffers[next(iter(self._buffers))]
        self._buffers[size] = buffers  # most recently used last
        return buffers

    def _bind_batch(self, buffers):
        """Bind new batch buffers to the engine's sessions."""
        raise NotImplementedError
