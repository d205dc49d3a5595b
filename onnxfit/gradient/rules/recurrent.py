"""Expansions of the recurrent operators LSTM, GRU and RNN.

These operators are not differentiated by a rule of their own: before the
reverse pass, each one on the way from a differentiated weight to the loss
is replaced, in the gradient graph only, by its recurrence unrolled over
the time steps into operators that have rules (see :data:`.registry.EXPANSIONS`).
The unrolled graph computes the input projections of every time step and
direction at once (one MatMul of X with the input weights) and writes only
the recurrent product, a Gemm, per step; the rules of MatMul, Gemm, Split,
the activations and the element-wise arithmetic then differentiate it.

The gate order follows the ONNX specification, which onnxruntime's kernels
share: LSTM weights stack the gates as input, output, forget, cell (iofc),
GRU weights as update, reset, hidden (zrh); B holds the input biases of
every gate, then the recurrent ones.

Refused (:class:`.NotDifferentiable`): a sequence length that shape
inference leaves open, per-sequence lengths (``sequence_lens``) other than
the full length, non-zero LSTM peepholes, ``clip``, LSTM's
``input_forget=1``, and activations other than the defaults (RNN: Tanh,
Relu or Sigmoid).
"""

import numpy as np

from .registry import NotDifferentiable, expansion


def _refuse(reason):
    # The reverse pass adds what works instead: freezing the weights behind
    # the node, or training another output.
    raise NotDifferentiable(reason)


class _Recurrence:
    """What the three operators share: the checks, the sizes, the input
    projections of every step, the recurrent weights and initial states of
    each direction, and the assembly of the outputs.

    Parameters
    ----------
    g : RuleContext
    node : NodeView
    gates : int
        Gates per direction (LSTM 4, GRU 3, RNN 1).
    defaults : list of str
        Default activations of one direction.
    allowed : list of tuple of str, optional
        Activation lists of one direction accepted besides the defaults.
    """

    def __init__(self, g, node, gates, defaults, allowed=()):
        self.g, self.node = g, node
        self.gates = gates
        direction = node.attr("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            _refuse(f"direction={direction!r} is not an ONNX direction.")
        self.reverse = {"forward": [False], "reverse": [True],
                        "bidirectional": [False, True]}[direction]
        self.directions = len(self.reverse)
        self.layout = int(node.attr("layout", 0))
        if node.attr("clip") is not None:
            _refuse("clip (the cell values clipped) is not supported.")
        activations = node.attr("activations")
        if activations is not None:
            accepted = [tuple(a.lower() for a in defaults)] + [
                tuple(a.lower() for a in row) for row in allowed]
            width = len(defaults)
            listed = list(activations)
            chosen = []
            for d in range(self.directions):
                row = tuple(a.lower() for a in listed[d * width:(d + 1) * width])
                if row not in accepted or len(listed) != width * self.directions:
                    _refuse(
                        f"activations={list(activations)} are not supported: onnxfit "
                        f"unrolls {node.op_type} with its default activations {defaults}"
                        + (f" or {[list(r) for r in allowed]}" if allowed else "") + "."
                    )
                chosen.append(row)
            self.activations = chosen
        else:
            self.activations = [tuple(a.lower() for a in defaults)] * self.directions
        x = node.input[0]
        shape = g.shape(x)
        time_axis = 0 if self.layout == 0 else 1
        steps = None if shape is None or len(shape) != 3 else shape[time_axis]
        if not isinstance(steps, int):
            _refuse(
                "the sequence length must be static: onnxfit unrolls the recurrence over "
                "the time steps, and shape inference leaves the length of X's time axis "
                f"open ({shape}). The onnxfit estimators pin the per-sample shape of the "
                "training graph to the data's; with OnnxFunction, declare a static "
                "sequence dimension in the graph's input shape. Both take the first axis "
                "of the input as the batch: export time-major models batch-first "
                "(PyTorch: batch_first=True)."
            )
        self.steps = steps
        self.batch_axis = 1 - time_axis
        hidden = node.attr("hidden_size")
        if hidden is None:
            r_shape = g.static_shape(node.input[2])
            hidden = None if r_shape is None else r_shape[2]
        if hidden is None:
            _refuse("hidden_size is neither an attribute nor known from R's shape.")
        self.hidden = int(hidden)
        if node.has_input(4):
            lengths = g.const_value(node.input[4])
            if lengths is None or not np.all(np.asarray(lengths) == steps):
                _refuse(
                    "sequence_lens (sequences of different lengths in one batch) is not "
                    "supported; pad the sequences to one length and leave sequence_lens "
                    "out."
                )

    # -- inputs ------------------------------------------------------------------------
    def per_direction(self, value, axis):
        """``value`` cut along ``axis`` into one tensor per direction, that
        axis removed."""
        g = self.g
        if self.directions == 1:
            return [g.Squeeze(value, g.ints([axis]))]
        parts = g.Split(value, g.ints([1] * self.directions), axis=axis,
                        n_outputs=self.directions)
        return [g.Squeeze(p, g.ints([axis])) for p in parts]

    def biases(self):
        """``(Wb, Rb)``, each ``[directions, gates * hidden]``, or None
        without B."""
        g, node = self.g, self.node
        if not node.has_input(3):
            return None
        width = self.gates * self.hidden
        return g.Split(node.input[3], g.ints([width, width]), axis=1, n_outputs=2)

    def projections(self, input_bias, chunks):
        """The input projections ``X W^T (+ input_bias)`` of every step.

        Parameters
        ----------
        input_bias : str or None
            ``[directions, gates * hidden]``, added to every step.
        chunks : list of int
            Widths a direction's projection is cut into (they add up to
            ``gates * hidden``).

        Returns
        -------
        list
            Per direction, per chunk, the list of ``[batch, width]`` tensors
            of the time steps in time order.
        """
        g, node = self.g, self.node
        x, w = node.input[0], node.input[1]
        if self.layout == 0:
            x = g.Transpose(x, perm=[1, 0, 2])
        # [directions, G*H, I] -> [I, directions*G*H]: one product for every
        # gate and direction of every step.
        stacked = g.Reshape(g.Transpose(w, perm=[2, 0, 1]), g.ints([0, -1]))
        projected = g.MatMul(x, stacked)
        if input_bias is not None:
            projected = g.Add(projected, g.Reshape(input_bias, g.ints([-1])))
        # [B, T, directions*G*H] -> [B, T*directions*G*H], cut by one Split
        # of static widths into every step's pieces: no per-step Squeeze,
        # and no run-time sizes in the backward pass's Concat.
        k = len(chunks)
        widths = list(chunks) * (self.directions * self.steps)
        if len(widths) == 1:
            pieces = [g.Reshape(projected, g.ints([0, -1]))]
        else:
            pieces = g.Split(g.Reshape(projected, g.ints([0, -1])), g.ints(widths), axis=1,
                             n_outputs=len(widths))
        return [[[pieces[(t * self.directions + d) * k + c] for t in range(self.steps)]
                 for c in range(k)] for d in range(self.directions)]

    def initial(self, index):
        """Initial state (input ``index``) of each direction, ``[batch,
        hidden]``, or None per direction when absent (a zero state)."""
        if not self.node.has_input(index):
            return [None] * self.directions
        return self.per_direction(self.node.input[index], 0 if self.layout == 0 else 1)

    def zeros(self):
        """A zero state ``[batch, hidden]``."""
        g, x = self.g, self.node.input[0]
        batch = g.Shape(x, start=self.batch_axis, end=self.batch_axis + 1)
        return g.fill(g.Concat(batch, g.ints([self.hidden]), axis=0), 0.0, like=x)

    def order(self, d):
        """Time steps in the order direction ``d`` visits them."""
        steps = range(self.steps)
        return list(reversed(steps)) if self.reverse[d] else list(steps)

    # -- outputs -----------------------------------------------------------------------
    def outputs(self, sequences, finals):
        """The values of the node's outputs.

        Parameters
        ----------
        sequences : list of list of str
            Per direction, the hidden state of each step in time order.
        finals : list of list of str or None
            Per direction, each further state output (Y_h, then Y_c for
            LSTM): the state after the direction's last step.

        Returns
        -------
        list of str or None
            One value per output of the node, None where it is unused.
        """
        g, node = self.g, self.node
        hidden, d_count = self.hidden, self.directions
        wanted = [k < len(node.output) and bool(node.output[k]) for k in range(3)]
        values = [None] * len(node.output)
        if wanted[0]:
            # Concatenated along the hidden axis, every size is static:
            # [B, T*directions*H] -> [B, T, directions, H] is layout 1's Y.
            y = g.Reshape(g.Concat(*[sequences[d][t] for t in range(self.steps)
                                     for d in range(d_count)], axis=1),
                          g.ints([-1, self.steps, d_count, hidden]))
            if self.layout == 0:
                y = g.Transpose(y, perm=[1, 2, 0, 3])
            values[0] = y
        for k, states in enumerate(finals, start=1):
            if k >= len(node.output) or not wanted[k]:
                continue
            if d_count == 1:
                values[k] = g.Unsqueeze(states[0], g.ints([0 if self.layout == 0 else 1]))
                continue
            # [B, directions*H] -> [B, directions, H], layout 1's.
            joined = g.Reshape(g.Concat(*states, axis=1), g.ints([-1, d_count, hidden]))
            values[k] = joined if self.layout == 1 else g.Transpose(joined, perm=[1, 0, 2])
        return values


def _activation(g, name, x):
    return {"tanh": g.Tanh, "relu": g.Relu, "sigmoid": g.Sigmoid}[name](x)


@expansion("LSTM")
def lstm(g, node):
    """LSTM unrolled: per step and direction, with gates iofc,

    ``i, o, f = sigmoid(x W^T + h R^T + b)``, ``c~ = tanh(...)``,
    ``c = f c_prev + i c~``, ``h = o tanh(c)``.
    """
    rnn = _Recurrence(g, node, 4, ["Sigmoid", "Tanh", "Tanh"])
    if int(node.attr("input_forget", 0)):
        _refuse("input_forget=1 (coupled input and forget gates) is not supported.")
    if node.has_input(7):
        peepholes = g.const_value(node.input[7])
        if peepholes is None or np.any(peepholes != 0):
            _refuse("peephole connections (input P) are not supported.")
    h_size = rnn.hidden
    biases = rnn.biases()
    input_bias = None if biases is None else g.Add(*biases)
    projections = rnn.projections(input_bias, [4 * h_size])
    weights = rnn.per_direction(node.input[2], 0)
    h0, c0 = rnn.initial(5), rnn.initial(6)
    sequences, last_h, last_c = [], [], []
    for d in range(rnn.directions):
        h, c = h0[d], c0[d]
        states = [None] * rnn.steps
        for t in rnn.order(d):
            x_part = projections[d][0][t]
            gates = x_part if h is None else g.Gemm(h, weights[d], x_part, transB=1)
            # i, o and f are contiguous: one Sigmoid for the three.
            sigmoid_part, cell_part = g.Split(gates, g.ints([3 * h_size, h_size]), axis=1,
                                              n_outputs=2)
            i, o, f = g.Split(g.Sigmoid(sigmoid_part), g.ints([h_size] * 3), axis=1,
                              n_outputs=3)
            update = g.Mul(i, g.Tanh(cell_part))
            c = update if c is None else g.Add(g.Mul(f, c), update)
            h = g.Mul(o, g.Tanh(c))
            states[t] = h
        sequences.append(states)
        last_h.append(h)
        last_c.append(c)
    return rnn.outputs(sequences, [last_h, last_c])


@expansion("GRU")
def gru(g, node):
    """GRU unrolled: per step and direction, with gates zrh,

    ``z, r = sigmoid(x W^T + h R^T + b)``, ``h~ = tanh(x Wh^T + r (h Rh^T +
    Rbh) + Wbh)`` (``linear_before_reset=1``, PyTorch's form) or ``tanh(x
    Wh^T + (r h) Rh^T + Rbh + Wbh)`` (0), ``h = (1 - z) h~ + z h_prev``.
    """
    rnn = _Recurrence(g, node, 3, ["Sigmoid", "Tanh"])
    h_size = rnn.hidden
    before_reset = int(node.attr("linear_before_reset", 0)) != 0
    biases = rnn.biases()
    recurrent_bias = [None] * rnn.directions
    if biases is None:
        input_bias = None
    elif before_reset:
        # Rbh is multiplied by r: the recurrent biases stay in the
        # recurrent product (as its Gemm's C).
        input_bias = biases[0]
        recurrent_bias = rnn.per_direction(biases[1], 0)
    else:
        input_bias = g.Add(*biases)
    projections = rnn.projections(input_bias, [2 * h_size, h_size])
    weights = rnn.per_direction(node.input[2], 0)
    h0 = rnn.initial(5)
    sequences, last_h = [], []
    for d in range(rnn.directions):
        h = h0[d]
        if before_reset and h is None:
            # r multiplies h R^T + Rbh, which is Rbh for a zero state: the
            # first step is the general one.
            h = rnn.zeros()
        if not before_reset and (h is not None or rnn.steps > 1):
            weight_zr, weight_h = g.Split(weights[d], g.ints([2 * h_size, h_size]), axis=0,
                                          n_outputs=2)
        states = [None] * rnn.steps
        for t in rnn.order(d):
            x_zr, x_h = projections[d][0][t], projections[d][1][t]
            if before_reset:
                product = g.Gemm(h, weights[d], recurrent_bias[d] or "", transB=1)
                h_zr, h_h = g.Split(product, g.ints([2 * h_size, h_size]), axis=1, n_outputs=2)
                z, r = g.Split(g.Sigmoid(g.Add(x_zr, h_zr)), g.ints([h_size, h_size]), axis=1,
                               n_outputs=2)
                candidate = g.Tanh(g.Add(x_h, g.Mul(r, h_h)))
            elif h is None:
                z, r = g.Split(g.Sigmoid(x_zr), g.ints([h_size, h_size]), axis=1, n_outputs=2)
                candidate = g.Tanh(x_h)
            else:
                zr = g.Sigmoid(g.Gemm(h, weight_zr, x_zr, transB=1))
                z, r = g.Split(zr, g.ints([h_size, h_size]), axis=1, n_outputs=2)
                candidate = g.Tanh(g.Gemm(g.Mul(r, h), weight_h, x_h, transB=1))
            # (1 - z) h~ + z h = h~ + z (h - h~); h = 0 before the first step
            # without initial_h.
            if h is None:
                h = g.Sub(candidate, g.Mul(z, candidate))
            else:
                h = g.Add(candidate, g.Mul(z, g.Sub(h, candidate)))
            states[t] = h
        sequences.append(states)
        last_h.append(h)
    return rnn.outputs(sequences, [last_h])


@expansion("RNN")
def rnn_(g, node):
    """RNN unrolled: ``h = f(x W^T + h_prev R^T + b)`` per step and
    direction, f Tanh (the default), Relu or Sigmoid."""
    rnn = _Recurrence(g, node, 1, ["Tanh"], allowed=[("Relu",), ("Sigmoid",)])
    biases = rnn.biases()
    input_bias = None if biases is None else g.Add(*biases)
    projections = rnn.projections(input_bias, [rnn.hidden])
    weights = rnn.per_direction(node.input[2], 0)
    h0 = rnn.initial(5)
    sequences, last_h = [], []
    for d in range(rnn.directions):
        h = h0[d]
        activation = rnn.activations[d][0]
        states = [None] * rnn.steps
        for t in rnn.order(d):
            x_part = projections[d][0][t]
            pre = x_part if h is None else g.Gemm(h, weights[d], x_part, transB=1)
            h = _activation(g, activation, pre)
            states[t] = h
        sequences.append(states)
        last_h.append(h)
    return rnn.outputs(sequences, [last_h])
