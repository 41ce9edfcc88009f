"""The seed experiment in Keras 3 on its JAX backend: the peer that rnnjax is timed against.

    python -m benchmarks.keras_seed [--steps 4001] [--no-unroll]

The Keras tutorial's recipe, kept as it was: ``SimpleRNN(50, unroll=True)`` -> ``Dense(10)``
-> softmax, ``Adam(1e-3)``, categorical cross-entropy, batch 50 walked in order with
``train_on_batch``, ``evaluate`` on the full test set after every 500th step, numpy seed
1337, pixels / 255. It reads the same verified MNIST as rnnjax (the IDX reader), and, as
rnnjax, imports no TensorFlow (``benchmarks.harness.without_tensorflow``: Keras' seeding would
import it where installed, seconds of start-up); its last line says whether TensorFlow was
loaded.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")


def main(argv=None) -> None:
    start = time.perf_counter()
    from benchmarks import harness  # imports JAX: timed with the process, as Keras' import

    parser = harness.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=harness.at_least(1), default=4001)
    parser.add_argument("--batch-size", type=harness.at_least(1), default=50)
    parser.add_argument("--unroll", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    with harness.without_tensorflow():
        import keras
        import numpy as np

        from rnnjax.data.idx import load_idx_dir
        from rnnjax.data.sources import EMBEDDED_MNIST, MNIST_MD5

        np.random.seed(1337)
        keras.utils.set_random_seed(1337)
    data = load_idx_dir(EMBEDDED_MNIST, MNIST_MD5)
    x_train = data.train_images.astype("float32") / 255
    x_test = data.test_images.astype("float32") / 255
    y_train = keras.utils.to_categorical(data.train_labels, 10)
    y_test = keras.utils.to_categorical(data.test_labels, 10)

    model = keras.Sequential([
        keras.Input((28, 28)),
        keras.layers.SimpleRNN(50, unroll=args.unroll),
        keras.layers.Dense(10),
        keras.layers.Activation("softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    batch_index = 0
    train_start = time.perf_counter()
    for step in range(args.steps):
        x_batch = x_train[batch_index : batch_index + args.batch_size]
        y_batch = y_train[batch_index : batch_index + args.batch_size]
        model.train_on_batch(x_batch, y_batch)
        batch_index += args.batch_size
        batch_index = 0 if batch_index >= x_train.shape[0] else batch_index
        if step % 500 == 0 or step == args.steps - 1:
            cost, accuracy = model.evaluate(x_test, y_test, batch_size=y_test.shape[0],
                                            verbose=False)
            print(f"step {step:>5}  test cost:  {cost:.4f} test accuracy:  {accuracy:.4f}",
                  flush=True)
    now = time.perf_counter()
    print(f"keras {keras.__version__}: train+eval {now - train_start:.2f} s, "
          f"process {now - start:.2f} s; tensorflow loaded: {harness.tensorflow_loaded()}")


if __name__ == "__main__":
    main()
