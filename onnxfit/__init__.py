"""onnxfit: train ONNX graphs inside scikit-learn.

onnxfit differentiates the graph itself (a table of vector-Jacobian rules
that write standard ONNX, run by any onnxruntime build); updates come from
pluggable learning-rate objects.
"""

from .divergence import ConvergenceError
from .function import OnnxFunction
from .gradient_check import check_gradients
from .classifier import OnnxSGDClassifier
from .learning_rate import (
    BaseLearningRate,
    LearningRateAdagrad,
    LearningRateAdam,
    LearningRateAdamW,
    LearningRateMomentum,
    LearningRateRMSprop,
    LearningRateSGD,
    LearningRateSGDNesterov,
)
from .losses import (
    AbsoluteLoss,
    BaseLoss,
    ElasticLoss,
    EpsilonInsensitiveLoss,
    HingeLoss,
    HuberLoss,
    ModifiedHuberLoss,
    NegativeLogLikelihoodLoss,
    SigmoidCrossEntropyLoss,
    SoftmaxCrossEntropyLoss,
    SquaredEpsilonInsensitiveLoss,
    SquaredLoss,
)
from .penalties import ElasticNetPenalty, WeightPenalties
from .regressor import OnnxSGDRegressor
from .schedules import (
    AdaptiveSchedule,
    ConstantSchedule,
    CosineSchedule,
    InvScalingSchedule,
    OptimalSchedule,
    StepSchedule,
)
from .show_versions import show_versions

__version__ = "0.1.0"

__all__ = [
    "OnnxSGDRegressor",
    "OnnxSGDClassifier",
    "BaseLearningRate",
    "LearningRateSGD",
    "LearningRateSGDNesterov",
    "LearningRateMomentum",
    "LearningRateAdam",
    "LearningRateAdamW",
    "LearningRateRMSprop",
    "LearningRateAdagrad",
    "BaseLoss",
    "SquaredLoss",
    "AbsoluteLoss",
    "HuberLoss",
    "EpsilonInsensitiveLoss",
    "SquaredEpsilonInsensitiveLoss",
    "ElasticLoss",
    "SigmoidCrossEntropyLoss",
    "SoftmaxCrossEntropyLoss",
    "NegativeLogLikelihoodLoss",
    "HingeLoss",
    "ModifiedHuberLoss",
    "ElasticNetPenalty",
    "WeightPenalties",
    "ConstantSchedule",
    "InvScalingSchedule",
    "OptimalSchedule",
    "AdaptiveSchedule",
    "CosineSchedule",
    "StepSchedule",
    "OnnxFunction",
    "check_gradients",
    "ConvergenceError",
    "show_versions",
]
