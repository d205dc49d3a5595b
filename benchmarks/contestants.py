"""The contestants: onnxfit (each engine) and its peers, behind one interface.

A contestant is set up once (untimed except for onnxfit's one-time graph
building, which is reported on its own), then runs epochs that the runner
times.  ``before_epoch``/``after_epoch`` run outside the timer (thread
settings).  ``fit_once`` is what the memory probe measures: a fresh fit of
one epoch from the workload's data as a user holds it (X float32).

Fairness choices, all in the peers' favour:

* ``SGDRegressor`` gets a float64 copy of X made outside the timer (it
  converts float32 input on every call otherwise).
* Every same-footing row runs on one thread: onnxfit ``n_threads=1``,
  ``torch.set_num_threads(1)``, scikit-learn's MLP with BLAS limited to one
  thread (threadpoolctl).  Rows marked ``2 threads`` are shown for
  information.
* PyTorch and onnxfit start from the same initial weights and use the same
  update rule (SGD, momentum 0.9, Nesterov) and learning rate;
  scikit-learn's MLPs use their own initialisation with the same rule and
  rate.
* W4/W5 (PyTorch modules): onnxfit trains the module's export with
  ``train_mode=True`` (its default: BatchNormalization on batch statistics,
  Dropout active), PyTorch the same module in ``train()`` mode; both score
  in eval mode (running statistics, no Dropout).  No scikit-learn peer.
"""

import importlib.util
import warnings

import numpy as np

from .timing import BlasThreadLimit


def torch_available():
    return importlib.util.find_spec("torch") is not None


def _quiet():
    from sklearn.exceptions import ConvergenceWarning

    warnings.simplefilter("ignore", ConvergenceWarning)


class Contestant:
    """Interface (see module docstring)."""

    #: Unique id within a workload, used in CSV/JSON.
    id = ""
    library = ""
    label = ""
    threads = 1
    #: Peers get ratio columns; onnxfit rows get ratios against them.
    is_peer = False

    def __init__(self, workload):
        self.workload = workload

    def unavailable(self):
        """None, or why this contestant cannot run here."""
        return None

    def setup(self):
        """Prepare; return the one-time build time in seconds (None: nothing to build)."""
        return None

    def before_epoch(self):
        pass

    def after_epoch(self):
        pass

    def epoch(self):
        raise NotImplementedError

    def score(self):
        """R2 (regression) or accuracy (classification) on the training data."""
        raise NotImplementedError

    def fit_once(self):
        """A fresh one-epoch fit from the user's data (memory probe)."""
        raise NotImplementedError


# ---------------------------------------------------------------- onnxfit
class OnnxfitContestant(Contestant):
    """``OnnxSGDRegressor`` / ``OnnxSGDClassifier`` used as a user would."""

    library = "onnxfit"
    is_peer = False

    def __init__(self, workload, engine="fused", n_threads=1, backend="onnxfit"):
        super().__init__(workload)
        self.engine = engine
        self.threads = n_threads
        self.backend = backend
        # n_threads=None: the estimator's own default (what a user gets).
        tag = "default" if n_threads is None else f"{n_threads}t"
        self.id = f"onnxfit-{engine}-{tag}" + ("" if backend == "onnxfit" else "-ort")
        self.label = f"onnxfit {engine}" + (
            "" if n_threads == 1 else " (default threads)" if n_threads is None
            else f" ({n_threads} threads)") + (
            "" if backend == "onnxfit" else ", onnxruntime-training backend")
        self.est = None

    def _estimator_class(self):
        import onnxfit

        if self.workload.task == "classification":
            return getattr(onnxfit, "OnnxSGDClassifier", None)
        return onnxfit.OnnxSGDRegressor

    def unavailable(self):
        if getattr(self.workload, "needs_torch", False) and not torch_available():
            return (f"skipped: {self.workload.key}'s graph is PyTorch's export; torch is not "
                    "installed (pip install '.[bench]')")
        try:
            cls = self._estimator_class()
        except ImportError as exc:  # pragma: no cover - broken install
            return f"onnxfit does not import: {exc}"
        if cls is None:
            return "not available: onnxfit has no OnnxSGDClassifier yet"
        from onnxfit.engines import ENGINES

        if self.engine not in ENGINES:
            return f"not available: engine {self.engine!r} not in onnxfit.engines.ENGINES"
        if self.backend != "onnxfit":
            from onnxfit.gradient import check_backend

            try:
                check_backend(self.backend)
            except ImportError:
                return f"skipped: gradient backend {self.backend!r} needs its onnxruntime build"
        return None

    def make_estimator(self, max_iter=1):
        from onnxfit import LearningRateSGDNesterov

        wl = self.workload
        kwargs = dict(
            onnx_model=wl.onnx_graph(),
            learning_rate=LearningRateSGDNesterov(eta0=wl.learning_rate, momentum=0.9),
            batch_size=wl.batch_size,
            max_iter=max_iter,
            tol=None,
            shuffle=True,
            penalty=None,
            random_state=0,
            engine=self.engine,
            gradient_backend=self.backend,
        )
        if self.threads is not None:
            kwargs["n_threads"] = self.threads
        if wl.task == "classification":
            kwargs["loss"] = "log_loss"
        return self._estimator_class()(**kwargs)

    def _partial_fit(self, X, y):
        if self.workload.task == "classification":
            self.est.partial_fit(X, y, classes=self.workload.classes)
        else:
            self.est.partial_fit(X, y)

    def setup(self):
        """Build the estimator's training graphs with a first partial_fit on
        one batch: that is the one-time cost, timed here and reported apart."""
        import time

        wl = self.workload
        self.est = self.make_estimator()
        n = wl.batch_size
        start = time.perf_counter()
        self._partial_fit(wl.X[:n], wl.y[:n])
        return time.perf_counter() - start

    def epoch(self):
        self._partial_fit(self.workload.X, self.workload.y)

    def score(self):
        return float(self.est.score(self.workload.X, self.workload.y))

    def fit_once(self):
        self.make_estimator(max_iter=1).fit(self.workload.X, self.workload.y)


class OnnxfitFitLoopContestant(OnnxfitContestant):
    """Epochs inside one ``fit``: ``(t(fit, max_iter=1+k) - t(fit, max_iter=1)) / k``.

    The difference removes what one ``fit`` pays once (graph building,
    input validation), leaving the cost of an epoch of the training loop
    itself.  Shown for information; the targets use the ``partial_fit`` row,
    which also pays the per-call validation a user of ``partial_fit`` pays.
    """

    def __init__(self, workload, engine="fused", n_threads=1, k=3):
        super().__init__(workload, engine, n_threads)
        self.k = k
        self.id = f"onnxfit-{engine}-{n_threads}t-fitloop"
        self.label = f"onnxfit {engine}, fit() loop"

    def setup(self):
        self._fit(1)  # builds once; later fits rebuild (fit resets), as a user's would
        return None

    def _fit(self, max_iter):
        import time

        est = self.make_estimator(max_iter=max_iter)
        start = time.perf_counter()
        est.fit(self.workload.X, self.workload.y)
        self.est = est
        return time.perf_counter() - start

    def epoch(self):
        long = self._fit(1 + self.k)
        short = self._fit(1)
        return max(0.0, (long - short) / self.k)

    def score(self):
        return None  # each measurement restarts from the initial weights


# ----------------------------------------------------------- scikit-learn
class SGDRegressorContestant(Contestant):
    id = "sklearn-SGDRegressor"
    library = "scikit-learn"
    label = "SGDRegressor (per sample)"
    is_peer = True

    def make_estimator(self):
        from sklearn.linear_model import SGDRegressor

        return SGDRegressor(max_iter=1, tol=None, random_state=0)

    def setup(self):
        _quiet()
        self.X64 = self.workload.X.astype(np.float64)
        self.est = self.make_estimator()
        return None

    def epoch(self):
        self.est.partial_fit(self.X64, self.workload.y)

    def score(self):
        return float(self.est.score(self.X64, self.workload.y))

    def fit_once(self):
        _quiet()
        self.make_estimator().fit(self.workload.X, self.workload.y)


class SklearnMLPContestant(BlasThreadLimit, Contestant):
    """``MLPRegressor``/``MLPClassifier(solver='sgd', batch_size=256)``,
    Nesterov momentum 0.9 (its defaults), one ``partial_fit`` per epoch."""

    library = "scikit-learn"
    is_peer = True

    def __init__(self, workload, blas_threads=1):
        super().__init__(workload)
        # blas_threads=None: the BLAS library's default (what a user gets).
        self.threads = blas_threads
        name = "MLPClassifier" if workload.task == "classification" else "MLPRegressor"
        self.name = name
        if blas_threads is None:
            self.id, self.label = f"sklearn-{name}-default", f"{name} (BLAS default threads)"
        else:
            self.id = f"sklearn-{name}-{blas_threads}t"
            self.label = f"{name} (BLAS {blas_threads} thread{'s' if blas_threads > 1 else ''})"

    def make_estimator(self):
        from sklearn.neural_network import MLPClassifier, MLPRegressor

        wl = self.workload
        cls = MLPClassifier if wl.task == "classification" else MLPRegressor
        return cls(
            hidden_layer_sizes=tuple(wl.sizes[1:-1]), solver="sgd", batch_size=wl.batch_size,
            max_iter=1, learning_rate_init=wl.learning_rate, momentum=0.9,
            nesterovs_momentum=True, shuffle=True, random_state=0,
        )

    def setup(self):
        _quiet()
        self.est = self.make_estimator()
        return None

    def epoch(self):
        wl = self.workload
        if wl.task == "classification":
            self.est.partial_fit(wl.X, wl.y, classes=wl.classes)
        else:
            self.est.partial_fit(wl.X, wl.y)

    def score(self):
        return float(self.est.score(self.workload.X, self.workload.y))

    def fit_once(self):
        _quiet()
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=self.threads, user_api="blas"):
            self.make_estimator().fit(self.workload.X, self.workload.y)


# ----------------------------------------------------------------- PyTorch
class TorchContestant(Contestant):
    """``nn.Linear``/MLP (W4, W5: the workload's module, in ``train()``
    mode) + ``optim.SGD(momentum=0.9, nesterov=True)``, the workload's batch
    size, shuffled with ``torch.randperm`` every epoch: the usual loop."""

    library = "pytorch"
    is_peer = True

    def __init__(self, workload, threads=1):
        super().__init__(workload)
        # threads=None: PyTorch's own default (one per core), what a user gets.
        self.threads = threads
        if threads is None:
            self.id, self.label = "torch-default", "PyTorch (default threads)"
        else:
            self.id = f"torch-{threads}t"
            self.label = f"PyTorch ({threads} thread{'s' if threads > 1 else ''})"

    def unavailable(self):
        if not torch_available():
            return "skipped: torch is not installed (pip install '.[bench]')"
        return None

    def _build(self):
        import torch
        from torch import nn

        wl = self.workload
        if hasattr(wl, "torch_module"):  # W4, W5: the module onnxfit gets the export of
            model = wl.torch_module()
            opt = torch.optim.SGD(model.parameters(), lr=wl.learning_rate, momentum=0.9,
                                  nesterov=True)
            return (model, torch.from_numpy(wl.X), torch.from_numpy(wl.y),
                    nn.CrossEntropyLoss(), opt, torch.Generator().manual_seed(0))
        layers = []
        for k, (w, b) in enumerate(wl.weights):
            lin = nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
                lin.bias.copy_(torch.from_numpy(b))
            layers.append(lin)
            if k < len(wl.weights) - 1:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
        X = torch.from_numpy(wl.X)
        if wl.task == "classification":
            y = torch.from_numpy(wl.y)
            loss_fn = nn.CrossEntropyLoss()
        else:
            y = torch.from_numpy(wl.y.astype(np.float32)).reshape(-1, 1)
            loss_fn = nn.MSELoss()
        opt = torch.optim.SGD(model.parameters(), lr=wl.learning_rate, momentum=0.9,
                              nesterov=True)
        gen = torch.Generator().manual_seed(0)
        return model, X, y, loss_fn, opt, gen

    def setup(self):
        self.model, self.X, self.y, self.loss_fn, self.opt, self.gen = self._build()
        return None

    def before_epoch(self):
        import torch

        wanted = self.threads if self.threads is not None else _torch_default_threads()
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _run_epoch(self, model, X, y, loss_fn, opt, gen):
        import torch

        n = len(X)
        bs = self.workload.batch_size
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()

    def epoch(self):
        self._run_epoch(self.model, self.X, self.y, self.loss_fn, self.opt, self.gen)

    def score(self):
        import torch

        self.model.eval()  # a no-op for the MLPs; W4: running statistics, no Dropout
        try:
            with torch.no_grad():
                out = self.model(self.X).numpy()
        finally:
            self.model.train()
        wl = self.workload
        if wl.task == "classification":
            return float(np.mean(out.argmax(axis=1) == wl.y))
        from sklearn.metrics import r2_score

        return float(r2_score(wl.y, out.ravel()))

    def fit_once(self):
        self.before_epoch()
        self._run_epoch(*self._build())


def _torch_default_threads():
    """The number of threads PyTorch starts with (one per physical core)."""
    global _TORCH_DEFAULT
    if _TORCH_DEFAULT is None:
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True)
        _TORCH_DEFAULT = int(out.stdout.strip())
    return _TORCH_DEFAULT


_TORCH_DEFAULT = None


# ------------------------------------------------------------ the line-up
def onnxfit_engines():
    """Engine names onnxfit offers now ('forward_backward' once it lands)."""
    try:
        from onnxfit.engines import ENGINES
    except ImportError:  # pragma: no cover
        return ["fused"]
    names = list(ENGINES)
    return ["fused"] + [n for n in names if n != "fused"]


def backend_lineup(workload):
    """onnxfit's two gradient backends on each engine (same runtime)."""
    return [OnnxfitContestant(workload, engine, backend=backend)
            for engine in onnxfit_engines() for backend in ("onnxfit", "onnxruntime-training")]


def defaults_lineup(workload):
    """Each library at its own out-of-the-box thread settings, and onnxfit
    on 1 and 2 threads for comparison."""
    out = [OnnxfitContestant(workload, "fused", n_threads=None),
           OnnxfitContestant(workload, "fused", n_threads=1),
           OnnxfitContestant(workload, "fused", n_threads=2)]
    if workload.key == "W1":
        out.append(SGDRegressorContestant(workload))
    elif workload.sklearn_peer:
        out.append(SklearnMLPContestant(workload, blas_threads=None))
    out.append(TorchContestant(workload, threads=None))
    out.append(TorchContestant(workload, threads=1))
    return out


def lineup(workload, two_threads=True, fit_loop=False):
    """Contestants of ``workload``: onnxfit engines first, then the peers."""
    out = [OnnxfitContestant(workload, engine) for engine in onnxfit_engines()]
    if fit_loop:
        out.append(OnnxfitFitLoopContestant(workload, "fused"))
    if two_threads:
        out.append(OnnxfitContestant(workload, "fused", n_threads=2))
    if workload.key == "W1":
        out.append(SGDRegressorContestant(workload))
    elif workload.sklearn_peer:
        out.append(SklearnMLPContestant(workload, blas_threads=1))
        if two_threads:
            out.append(SklearnMLPContestant(workload, blas_threads=2))
    out.append(TorchContestant(workload, threads=1))
    if two_threads:
        out.append(TorchContestant(workload, threads=2))
    return out


def contestant_by_id(workload, cid):
    """Rebuild a contestant from its id (used by the memory probe's child)."""
    if cid.startswith("onnxfit-"):
        _, rest = cid.split("-", 1)
        backend = "onnxfit"
        if rest.endswith("-ort"):
            rest, backend = rest[:-4], "onnxruntime-training"
        engine, threads = rest.rsplit("-", 1)
        n_threads = None if threads == "default" else int(threads[:-1])
        return OnnxfitContestant(workload, engine, n_threads=n_threads, backend=backend)
    if cid == "sklearn-SGDRegressor":
        return SGDRegressorContestant(workload)
    if cid.startswith("sklearn-MLP"):
        return SklearnMLPContestant(workload, blas_threads=int(cid.rsplit("-", 1)[1][:-1]))
    if cid.startswith("torch-"):
        return TorchContestant(workload, threads=int(cid.rsplit("-", 1)[1][:-1]))
    raise ValueError(f"Unknown contestant id {cid!r}")
