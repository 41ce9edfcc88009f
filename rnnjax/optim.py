"""Optimizers: any optax optimizer by name, schedules, clipping, and Keras' exact Adam.

``make_optimizer(config)`` returns one ``optax.GradientTransformation``. ``keras_adam`` is
written as optax writes transformations, a pair of pure functions ``(init, update)``, and
follows Keras 3's update order to the letter, so rnnjax and Keras can be compared step by
step: its epsilon is added to the *uncorrected* ``sqrt(v)``, which differs from optax's
``adam`` (epsilon added to ``sqrt(v_hat)``).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnnjax import registry
from rnnjax.config import Config, ConfigError, error_line


class KerasAdamState(NamedTuple):
    count: jax.Array  # int32 []
    mu: optax.Params
    nu: optax.Params


def scale_by_keras_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Keras 3 ``Adam`` direction (without the learning rate and sign): see module doc."""

    def init(params: optax.Params) -> KerasAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return KerasAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(updates: optax.Updates, state: KerasAdamState, params: optax.Params | None = None
               ) -> tuple[optax.Updates, KerasAdamState]:
        """The direction of ``updates`` (the gradients), as optax's ``update`` is called."""
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, updates)

        def direction(m, v):
            t = count.astype(m.dtype)
            correction = jnp.sqrt(1 - jnp.power(jnp.asarray(b2, m.dtype), t)) / (
                1 - jnp.power(jnp.asarray(b1, m.dtype), t)
            )
            return (m * correction) / (jnp.sqrt(v) + eps)

        return jax.tree.map(direction, mu, nu), KerasAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def keras_adam(
    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Keras 3 ``Adam(learning_rate, beta_1=b1, beta_2=b2, epsilon=eps)``."""
    return optax.chain(
        scale_by_keras_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)
    )


def make_schedule(config: Config) -> optax.ScalarOrSchedule:
    """The learning rate: a constant, or an optax schedule over ``config.steps``."""
    if config.schedule == "constant":
        return config.learning_rate
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, config.steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps
    )


# Optimizers registered in Python by name (``--optimizer NAME``, ``Config.optimizer``): a
# factory ``(learning_rate, **options) -> optax.GradientTransformation``, the rate a float or
# an optax schedule, its options from --optimizer-kwargs (README, "How to extend"), under a
# name of its own (not optax's, nor keras_adam: a process that did not register it would
# build that one instead); the tuner's children import each from its module, as a cell.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {}
REGISTRY = registry.Registry(OPTIMIZERS, {}, "--optimizer")


def make_optimizer(config: Config, params: optax.Params | None = None, *,
                   check: bool = True) -> optax.GradientTransformation:
    """``config.optimizer`` (one registered in :data:`OPTIMIZERS`, an optax function name,
    or ``keras_adam``) with its options.

    ``--adam-eps``, when set, goes to an optimizer that takes ``eps`` (one that takes none
    is refused: it would not honour it); an optimizer that takes a random ``key``
    (``noisy_sgd``) gets 0, which each run's initial state replaces with keys from its
    ``--seed`` (``rnnjax.train.create_state``: a typed key; one of one's own that keeps a
    legacy uint32 key is refused); ``--optimizer-kwargs``
    (JSON) to the optimizer's own arguments; ``--clip-norm`` chains global-norm clipping first.
    ``params``: the parameters it will update (arrays, or ``jax.ShapeDtypeStruct`` values:
    ``Model.param_shapes``), on which :func:`check_options` tries the options; default
    those of ``make_model(config)``. ``check``: False to rebuild the optimizer a checkpoint
    was trained with, options untried (its run took them; eval and predict need only its
    state's tree).
    """
    if config.optimizer in OPTIMIZERS and (config.optimizer == "keras_adam"
                                           or hasattr(optax, config.optimizer)):
        raise ConfigError(
            f"--optimizer {config.optimizer}: registered in rnnjax.optim.OPTIMIZERS over "
            f"{'rnnjax' if config.optimizer == 'keras_adam' else 'optax'}'s of that name, "
            "which a process that did not register it (a --resume, rnnjax eval) would "
            "build in its place; register yours under a name of its own")
    factory = OPTIMIZERS.get(config.optimizer) or (
        keras_adam if config.optimizer == "keras_adam" else getattr(optax, config.optimizer, None))
    if config.optimizer in OPTIMIZERS and not callable(factory):
        raise ConfigError(
            f"--optimizer {config.optimizer}: registered in rnnjax.optim.OPTIMIZERS as a "
            f"{type(factory).__name__}, not a function of learning_rate; register the "
            f"function: OPTIMIZERS[{config.optimizer!r}] = my_optimizer (not "
            "my_optimizer(1e-3))")
    if factory is None or not callable(factory) or config.optimizer.startswith("_"):
        raise ConfigError(
            f"--optimizer {config.optimizer!r} is not an optax optimizer; try adam, adamw, "
            "sgd, rmsprop, lion, keras_adam (any optax.NAME that takes learning_rate), or one "
            "registered in rnnjax.optim.OPTIMIZERS"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--optimizer {config.optimizer!r}: not a function ({e})") from e
    if "learning_rate" not in signature.parameters:
        raise ConfigError(
            f"--optimizer {config.optimizer!r} takes no learning_rate: not an optimizer"
        )
    # A factory of **options takes any option: the factory itself then judges each.
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD
                     for p in signature.parameters.values())
    kwargs = parse_kwargs(config.optimizer_kwargs)
    if "learning_rate" in kwargs:
        raise ConfigError("--optimizer-kwargs: learning_rate is set by --learning-rate (and "
                          "--schedule); remove it from --optimizer-kwargs")
    if config.adam_eps > 0 and "eps" in kwargs:
        raise ConfigError(f"--adam-eps {config.adam_eps} and --optimizer-kwargs eps "
                          f"{kwargs['eps']}: both set eps; keep one")
    if config.adam_eps > 0 and "eps" not in signature.parameters and not open_ended:
        raise ConfigError(f"--adam-eps {config.adam_eps}: --optimizer {config.optimizer} "
                          "takes no eps; drop --adam-eps")
    if config.adam_eps > 0:
        kwargs["eps"] = config.adam_eps
    drawn = {"key", "seed"} & set(kwargs) & set(signature.parameters)
    if drawn:
        raise ConfigError(f"--optimizer-kwargs: {sorted(drawn)[0]} is drawn from --seed (the "
                          "optimizer's random keys split from the run's); remove it and set "
                          "--seed")
    if "key" in signature.parameters:  # optax will require one: each run's replaces it
        kwargs["key"] = 0
    unknown = sorted(set(kwargs) - set(signature.parameters))
    if unknown and not open_ended:
        raise ConfigError(
            f"--optimizer-kwargs: {config.optimizer} has no argument(s) {unknown}; "
            f"it takes {sorted(set(signature.parameters) - {'learning_rate'})}"
        )
    try:
        optimizer = factory(learning_rate=make_schedule(config), **kwargs)
    except Exception as e:  # an option optax cannot take: 2 / (1 - b2) with b2 1, a string
        raise ConfigError(f"--optimizer {config.optimizer}: {_options(config)}cannot be "
                          f"built ({error_line(e)}); {OPTION_FIX}") from None
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ConfigError(f"--optimizer {config.optimizer!r} did not build an optimizer")
    if check:
        check_options(config, optimizer, kwargs, params)
    if config.clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(config.clip_norm), optimizer)
    return optimizer


OPTION_FIX = ("give each option a value of the type it takes, within its range (numbers as "
              "JSON numbers)")


def _options(config: Config) -> str:
    """``--optimizer-kwargs '...'`` and a space, where given."""
    return f"--optimizer-kwargs '{config.optimizer_kwargs}' " if config.optimizer_kwargs else ""


def check_options(config: Config, optimizer: optax.GradientTransformation,
                  kwargs: dict[str, Any], params: optax.Params | None = None) -> None:
    """:class:`ConfigError` unless the options ``kwargs`` work on ``params`` (default:
    ``make_model(config)``'s): each mask (:func:`check_mask`), then one update
    ``update(grads, state, params)`` as the train step calls it. An option of the wrong type
    (``{"b1": "0.9"}``), or an optimizer whose update needs more than the gradients
    (``lbfgs``: the loss function), would otherwise fail inside the first compiled step.
    Traced on abstract parameters (``jax.eval_shape``): nothing is compiled or allocated,
    nor is JAX's backend started (``--xla-flags`` may still be set)."""
    from rnnjax.cells import layout_mismatch

    if params is None:
        from rnnjax.model import make_model

        # Every form of a cell has the same parameters: 'auto' needs no native kernels.
        params = make_model(config.replace(backward="auto")).param_shapes()
    for name, value in kwargs.items():
        if "mask" in name:
            check_mask(name, value, params)

    def init_and_update(p: optax.Params) -> tuple[optax.OptState, optax.Updates]:
        state = optimizer.init(p)
        return state, optimizer.update(p, state, p)[0]

    try:
        state, updates = jax.eval_shape(init_and_update, params)
    except Exception as e:  # raised by optax tracing the user's options
        raise ConfigError(
            f"--optimizer {config.optimizer} {_options(config)}cannot update parameters "
            f"({error_line(e)}); {OPTION_FIX}, or choose an optimizer whose update takes "
            "only the gradients (adam, adamw, sgd, ...)"
        ) from None
    # rnnjax gave a `key` option 0, which each run replaces, typed keys only
    if "key" in kwargs and any(getattr(leaf, "dtype", None) == jnp.uint32
                               and leaf.shape[-1:] == (2,) for leaf in jax.tree.leaves(state)):
        raise ConfigError(
            f"--optimizer {config.optimizer} keeps its random key as uint32 [2] "
            "(jax.random.PRNGKey), which rnnjax cannot tell from other state to draw it "
            "from --seed: every seed would add the same noise; make the key with "
            "jax.random.key(key)")
    mismatch = layout_mismatch(updates, params)
    if mismatch is not None:  # optax.apply_updates would broadcast them into the params
        raise ConfigError(
            f"--optimizer {config.optimizer} {_options(config)}makes updates that are not "
            f"the parameters' shapes ({mismatch}): its update must return one array of each "
            "parameter's shape, in the parameters' tree")


def check_mask(name: str, value: Any, params: optax.Params) -> None:
    """Refuse a mask option (``adamw``'s ``mask``: which parameters decay) that is not
    ``null`` (no mask: optax's default), ``true``/``false``, or a tree of them that is the
    parameters' tree or a prefix of it: optax reads a string as one leaf that masks every
    parameter in, and fails on another tree inside the first step. The line gives the
    parameters' own tree, every leaf ``true``, to edit."""
    if value is None or isinstance(value, bool):
        return
    whole = json.dumps(_as_json(jax.tree.map(lambda _: True, params)))
    if isinstance(value, (dict, list)):
        leaves = jax.tree.leaves(value, is_leaf=lambda x: not isinstance(x, (dict, list)))
        if all(isinstance(leaf, bool) for leaf in leaves):
            try:
                jax.tree.map(lambda m, p: m, value, params)  # a prefix of the parameters
                return
            except ValueError:
                problem = f"{json.dumps(value)} is not the parameters' tree nor a prefix of it"
        else:
            problem = f"{json.dumps(value)} has leaves other than true and false"
    else:
        problem = f"{json.dumps(value)} is not true, false or a tree of them"
    raise ConfigError(f"--optimizer-kwargs: {name} {problem}; give true/false, or the "
                      f"model's parameters' tree with true/false at its leaves: {whole}")


def _as_json(tree: Any) -> Any:
    """A tree of mappings and sequences as JSON's objects and lists."""
    if isinstance(tree, Mapping):
        return {str(k): _as_json(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_as_json(v) for v in tree]
    return tree


def parse_kwargs(text: str) -> dict[str, Any]:
    """``--optimizer-kwargs`` JSON object -> dict."""
    if not text:
        return {}
    def not_a_number(name: str) -> Any:  # JSON's NaN/Infinity extensions: no option wants one
        raise ConfigError(f"--optimizer-kwargs: {name} is not a usable value; give numbers")

    def finite(digits: str) -> float:  # 1e400 is Infinity too
        number = float(digits)
        if not math.isfinite(number):
            raise ConfigError(f"--optimizer-kwargs: {digits} is {number} as a float; give "
                              "finite numbers")
        return number

    try:
        value = json.loads(text, parse_constant=not_a_number, parse_float=finite)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--optimizer-kwargs is not valid JSON ({e.msg}); write e.g. '{{\"b1\": 0.8}}'"
        ) from e
    if not isinstance(value, dict):
        raise ConfigError("--optimizer-kwargs must be a JSON object, e.g. '{\"b1\": 0.8}'")
    return value
