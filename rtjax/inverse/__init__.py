"""The learned inverse model (LearnMorph-Infer style): tumour masks + tissue -> FK parameters.

* `rtjax.inverse.config`: `InverseConfig` (generator, network, training), YAML overrides.
* `rtjax.inverse.network`: `InverseNet`, a small 3-D ResNet ensemble (Flax NNX).
* `rtjax.inverse.weights`: export / load of weights folders (shipped: `rtjax/weights/inverse`).
* `rtjax.inverse.predict`: the estimate for one case.
* `rtjax.inverse.dataset`, `rtjax.inverse.train`, `rtjax.inverse.evaluate`: simulated
  data, training (`train_and_evaluate(config, workdir)`) and validation; imported on their
  own (inference never imports them).

The training simulations come from `growth.inverse` (pure JAX).
"""

from rtjax.inverse.config import InverseConfig, TrainConfig, config_from_dict, load_config
from rtjax.inverse.network import InverseNet, NetConfig, create_ensemble
from rtjax.inverse.predict import predict
from rtjax.inverse.weights import DEFAULT_WEIGHTS, InverseWeights, export_weights, load_weights

__all__ = [
    "InverseConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "InverseNet",
    "NetConfig",
    "create_ensemble",
    "predict",
    "DEFAULT_WEIGHTS",
    "InverseWeights",
    "export_weights",
    "load_weights",
]
