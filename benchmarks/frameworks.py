"""Side-by-side throughput of the study's CNN in agejax, PyTorch and Keras.

Why: issue 5 asks agejax to train at least 1.2x as fast as the faster of
Keras and PyTorch on CPU, and to evaluate at least as fast as Keras. This
script builds the same network (1,635,556 parameters incl. BatchNorm
statistics, 100 classes) in each framework and prints images/s and ratios.
Each framework runs on its default device: the GPU where there is one
(PyTorch: CUDA when available), else the CPU; the output's first line names
each one's device.

Each framework runs in its own worker process (so thread pools do not
compete) and the driver asks the workers for one timed repeat in turn, so
that load from other users of a shared machine hits every framework alike.
Each row is the median over ``--repeats`` rounds of ``--steps`` steps, after
``--warmup`` untimed steps; each ratio the median of the rounds' own ratios
(`format_table`). Every worker runs under the same host allocator
(``--host_malloc``, see `agejax.host_malloc`), and the driver pauses
``--settle_s`` before each timed repeat so that the previous worker's
spinning threads do not slow the next one.

Load from outside hits the frameworks unequally: PyTorch's OpenMP threads,
which spin while they wait, slow down far more than agejax's or Keras' when
another process takes a core (3.25x agejax / PyTorch on a loaded 2-core Zen 3
where the quiet machine gives 1.26x; docs/performance_log.md, session 29).
So each worker counts the CPU time that others (other processes, the
hypervisor's steal) took during its repeat, from /proc, and a round in which
any repeat lost more than ``--max_others_cpu`` of the CPUs is run again, up
to ``--repeats`` extra rounds per case; the output says how many were.

Short repeats weigh a slow step heavily: a step that page-faults fresh
memory in, or one right after another worker has churned memory. Repeats
of 12 steps (``--steps=12``) measure the steady state of a training run's
steps back to back (docs/performance_log.md, session 22).

Each rival also runs in the configurations a user tuning it would try:
``torch-compile`` (Inductor), ``torch-passive`` (OpenMP threads that sleep
while they wait), ``keras-onednn`` (TensorFlow's oneDNN kernels, off by
default on CPUs without AVX-512 VNNI, AVX-512 BF16 or AMX instructions)
and ``keras-xla`` (``jit_compile=True``).
With more than one rival, the table's last ratio per agejax row is against
the fastest of them, round by round.

Keras and PyTorch are benchmark-only extras (benchmarks/requirements-bench.txt),
never agejax dependencies. Run from the repository root:

  bench-venv/bin/python -m benchmarks.frameworks \
      --frameworks=agejax-auto,agejax-scan,torch,keras --batch_sizes=64,256
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags

from agejax import host_malloc

NUM_CLASSES = 100
IMAGE_SHAPE = (48, 48, 1)
CONV_FILTERS = ((32, 64), (128, 128), (128, 256))
DENSE_UNITS = (512, 512, 256)
EXPECTED_PARAMS = 1_635_556
FRAMEWORKS = (
    'agejax-auto',
    'agejax-scan',
    'agejax-bf16',
    'agejax-lax',
    'agejax-matmul',
    'agejax-ynnpack',
    'torch',
    'torch-passive',
    'torch-compile',
    'keras',
    'keras-onednn',
    'keras-xla',
)
# Environment each rival variant's worker sets before it imports its framework.
RIVAL_ENV = {
    # OpenMP pool threads sleep instead of spinning while they wait.
    'torch-passive': {'OMP_WAIT_POLICY': 'PASSIVE'},
    # TensorFlow's oneDNN kernels: on by default only on CPUs with AVX-512
    # VNNI, AVX-512 BF16 or AMX instructions.
    'keras-onednn': {'TF_ENABLE_ONEDNN_OPTS': '1'},
}

_FRAMEWORKS = flags.DEFINE_list(
    'frameworks', list(FRAMEWORKS), f'Subset of {FRAMEWORKS}.'
)
_BATCH_SIZES = flags.DEFINE_list(
    'batch_sizes', ['64', '256'], 'Training batch sizes.'
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    'eval_batch_size', 256, 'Evaluation batch size (0 skips evaluation).'
)
_SETTLE_S = flags.DEFINE_float(
    'settle_s',
    1.0,
    'Seconds of pause before each timed repeat, so that the previous'
    ' worker\'s threads have stopped spinning.',
)
_HOST_MALLOC = flags.DEFINE_enum(
    'host_malloc',
    None,
    host_malloc.MODES,
    'Host allocator (agejax.host_malloc) for every worker, so all frameworks'
    ' run alike: mimalloc or glibc retaining freed memory, as the experiments'
    ' run, or the system default. Default: what the experiments use'
    ' (host_malloc.default_mode()).',
)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats per row.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Steps per timed repeat.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing.')
_MAX_OTHERS_CPU = flags.DEFINE_float(
    'max_others_cpu',
    0.05,
    'A round is contended, and run again, when something else took more than'
    ' this share of the CPUs during one of its repeats (see the module doc).',
)
_SCAN_BATCHES = flags.DEFINE_integer(
    'scan_batches', 4, 'Batches per agejax-scan epoch (one compiled call).'
)

# A measurement: 'train' or 'eval', and a batch size.
Case = tuple[str, int]
# Builds, for a case, a function that runs one step and waits for it, and the
# number of batches that one call processes (1, or a whole scanned epoch).
StepBuilder = Callable[[Case], tuple[Callable[[], None], int]]


def _random_batch(batch_size: int, seed: int = 0) -> tuple[Any, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (batch_size,), dtype=np.int32)
  return images, labels


def _agejax_builder(variant: str, scan_batches: int) -> StepBuilder:
  """agejax's own model and jitted steps (agejax.steps).

  ``variant`` is a ``conv_impl`` (one of `agejax.conv.IMPLS`) for
  per-step training (`steps.train_step`); ``'scan'``: ``'auto'`` with
  training as `steps.train_epoch`, ``scan_batches`` batches of a
  device-resident dataset per compiled call; or ``'bf16'``: ``'auto'`` with
  bfloat16 compute (float32 parameters). Evaluation is `steps.eval_step`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from agejax import config as config_lib  # pylint: disable=g-import-not-at-top
  from agejax import steps  # pylint: disable=g-import-not-at-top

  model_config = config_lib.ModelConfig(
      num_classes=NUM_CLASSES,
      conv_filters=CONV_FILTERS,
      dense_units=DENSE_UNITS,
      conv_impl='auto' if variant in ('scan', 'bf16') else variant,
      dtype='bfloat16' if variant == 'bf16' else 'float32',
  )
  stage = config_lib.StageConfig(name='bench', epochs=1, learning_rate=1e-3)
  variables = steps.init_variables(
      jax.random.PRNGKey(0), model_config.build(), IMAGE_SHAPE
  )
  n_params = sum(int(np.size(v)) for v in jax.tree.leaves(variables))
  _check_params('agejax', n_params)

  def build(case: Case) -> tuple[Callable[[], None], int]:
    mode, batch_size = case
    images, labels = _random_batch(batch_size)
    batch = jax.device_put({
        'image': images,
        'label': labels,
        'mask': np.ones((batch_size,), bool),
    })
    # train_step donates its state, so each case gets its own copy.
    fresh = jax.tree.map(jax.numpy.copy, variables)
    state = [steps.create_train_state(model_config, stage, fresh)]
    rng = jax.random.PRNGKey(1)
    if mode == 'train' and variant == 'scan':
      images, labels = jax.device_put(_random_batch(scan_batches * batch_size))

      def run() -> None:
        state[0], out = steps.train_epoch(
            state[0], images, labels, rng, batch_size=batch_size
        )
        jax.block_until_ready(out)

      return run, scan_batches
    if mode == 'train':

      def run() -> None:
        state[0], out = steps.train_step(state[0], batch, rng)
        jax.block_until_ready(out)

    else:

      def run() -> None:
        jax.block_until_ready(steps.eval_step(state[0], batch))

    return run, 1

  return build


def _torch_builder(compiled: bool) -> StepBuilder:
  """PyTorch, channels_last, Adam, the same network; on CUDA if available.

  Eager, or with ``compiled`` the network's forward (and so its backward)
  through ``torch.compile`` (Inductor; one static graph per batch size and
  mode, compiled in the untimed warmup). BatchNorm as in agejax and Keras:
  epsilon 1e-3, running statistics decaying by 0.99.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  batch_norm = {'eps': 1e-3, 'momentum': 0.01}
  layers: list[nn.Module] = []
  cin = IMAGE_SHAPE[2]
  for block in CONV_FILTERS:
    for cout in block:
      layers += [nn.Conv2d(cin, cout, 3), nn.ReLU(), nn.BatchNorm2d(cout, **batch_norm)]
      cin = cout
    layers += [nn.MaxPool2d(2), nn.Dropout(0.25)]
  layers.append(nn.Flatten())
  fin = 1024
  for units in DENSE_UNITS:
    layers += [nn.Linear(fin, units), nn.ReLU(), nn.BatchNorm1d(units, **batch_norm)]
    layers.append(nn.Dropout(0.5))
    fin = units
  layers.append(nn.Linear(fin, NUM_CLASSES))
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = nn.Sequential(*layers).to(device, memory_format=torch.channels_last)
  n_params = sum(p.numel() for p in model.parameters()) + sum(
      b.numel() for n, b in model.named_buffers() if 'running' in n
  )
  _check_params('torch', n_params)
  forward = torch.compile(model, dynamic=False) if compiled else model
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = nn.CrossEntropyLoss()

  def build(case: Case) -> tuple[Callable[[], None], int]:
    mode, batch_size = case
    images, labels = _random_batch(batch_size)
    x = (
        torch.from_numpy(images)
        .permute(0, 3, 1, 2)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
    )
    y = torch.from_numpy(labels).long().to(device)
    if mode == 'train':

      def run() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x.float() / 255.0), y)
        loss.backward()
        opt.step()
        if device.type == 'cuda':
          torch.cuda.synchronize()

    else:

      def run() -> None:
        model.eval()
        with torch.inference_mode():
          logits = forward(x.float() / 255.0)
          loss_fn(logits, y).item()
          (logits.argmax(-1) == y).sum().item()

    return run, 1

  return build


def _keras_builder(xla: bool) -> StepBuilder:
  """Keras 3 on TensorFlow: compiled tf.function steps, through XLA with ``xla``."""
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  layers: list[Any] = [
      keras.Input(IMAGE_SHAPE),
      keras.layers.Rescaling(1 / 255),
  ]
  for block in CONV_FILTERS:
    for cout in block:
      layers += [
          keras.layers.Conv2D(cout, 3, activation='relu'),
          keras.layers.BatchNormalization(),
      ]
    layers += [keras.layers.MaxPooling2D(2), keras.layers.Dropout(0.25)]
  layers.append(keras.layers.Flatten())
  for units in DENSE_UNITS:
    layers += [
        keras.layers.Dense(units, activation='relu'),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.5),
    ]
  layers.append(keras.layers.Dense(NUM_CLASSES))
  model = keras.Sequential(layers)
  _check_params('keras', model.count_params())
  model.compile(
      optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-8),  # optax's and torch's
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=['accuracy'],
      jit_compile=xla,
  )

  def build(case: Case) -> tuple[Callable[[], None], int]:
    mode, batch_size = case
    # Tensors before timing, as the other frameworks' batches are on device.
    images, labels = (tf.convert_to_tensor(a) for a in _random_batch(batch_size))
    # A fresh tf.function per case: one traced again for a second batch size
    # gets an unknown batch dimension, and every case is to run as the first.
    if mode == 'train':
      model.make_train_function(force=True)
      return lambda: model.train_on_batch(images, labels), 1
    model.make_test_function(force=True)
    return lambda: model.test_on_batch(images, labels), 1

  return build


def _check_params(name: str, n_params: int) -> None:
  if n_params != EXPECTED_PARAMS:
    raise AssertionError(
        f'{name} network has {n_params} parameters, expected {EXPECTED_PARAMS}.'
    )


def _builder(framework: str, scan_batches: int) -> StepBuilder:
  if framework.startswith('agejax-'):
    return _agejax_builder(framework.removeprefix('agejax-'), scan_batches)
  if framework.startswith('torch'):
    return _torch_builder(compiled=framework == 'torch-compile')
  if framework.startswith('keras'):
    return _keras_builder(xla=framework == 'keras-xla')
  raise ValueError(f'Unknown framework {framework!r}; expected {FRAMEWORKS}.')


def device_of(framework: str) -> str:
  """The device ``framework`` computes on (its default), for the record.

  For Keras on a CPU, also whether TensorFlow's oneDNN kernels are on, so
  the record shows that ``keras-onednn`` (`RIVAL_ENV`) took effect and
  whether plain ``keras`` ran with them.
  """
  if framework.startswith('agejax-'):
    import jax  # pylint: disable=g-import-not-at-top
    device = jax.devices()[0]
    return f'{device.platform} ({device.device_kind})'
  if framework.startswith('torch'):
    import torch  # pylint: disable=g-import-not-at-top
    if torch.cuda.is_available():
      return f'cuda ({torch.cuda.get_device_name()})'
    return 'cpu'
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    return f'gpu ({gpus[0].name})'
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 'cpu'
  return f'cpu (oneDNN {"on" if _pywrap_util_port.IsMklEnabled() else "off"})'


def cpu_ticks() -> tuple[int, int, int] | None:
  """Clock ticks since boot: all CPUs busy, stolen by the hypervisor, and this process's own.

  From /proc/stat and /proc/self/stat (Linux); None where they cannot be read.
  """
  try:
    with open('/proc/stat') as f:
      fields = [int(x) for x in f.readline().split()[1:9]]
    with open('/proc/self/stat') as f:
      # Fields after the command name, which may hold spaces: utime, stime are 14, 15.
      own = f.read().rpartition(')')[2].split()
  except OSError:
    return None
  user, nice, system, _, _, irq, softirq, steal = fields
  return user + nice + system + irq + softirq, steal, int(own[11]) + int(own[12])


def others_share(
    start: tuple[int, int, int], end: tuple[int, int, int], wall_s: float, num_cpus: int,
    ticks_per_s: int,
) -> float:
  """Share of ``num_cpus`` CPUs' time over ``wall_s`` that others took (`cpu_ticks` at both ends)."""
  busy, steal, own = (e - s for e, s in zip(end, start, strict=True))
  return max(0, busy - own + steal) / ticks_per_s / (wall_s * num_cpus)


def rival_environment(framework: str, environ: Mapping[str, str]) -> dict[str, str]:
  """The environment ``framework``'s worker runs in: ``environ`` with its `RIVAL_ENV`.

  Every other variant's variables are removed, so a variable exported in
  the driver's shell cannot turn a default row into a tuned one.
  """
  tuned = {name for env in RIVAL_ENV.values() for name in env}
  env = {name: value for name, value in environ.items() if name not in tuned}
  env.update(RIVAL_ENV.get(framework, {}))
  return env


def _worker(
    framework: str, conn: Any, steps: int, warmup: int, scan_batches: int
) -> None:
  """Serves timing requests: receives a case, answers images/s and `others_share` (or None)."""
  env = rival_environment(framework, os.environ)
  for name in set(os.environ) - set(env):
    del os.environ[name]
  os.environ.update(env)
  build = _builder(framework, scan_batches)
  runs: dict[Case, tuple[Callable[[], None], int]] = {}
  num_cpus, ticks_per_s = len(os.sched_getaffinity(0)), os.sysconf('SC_CLK_TCK')
  conn.send(device_of(framework))
  while (case := conn.recv()) is not None:
    if case not in runs:
      runs[case] = build(case)
      for _ in range(warmup):
        runs[case][0]()
    run, batches = runs[case]
    ticks = cpu_ticks()
    start = time.perf_counter()
    for _ in range(steps):
      run()
    wall_s = time.perf_counter() - start
    end = cpu_ticks()
    share = None if ticks is None or end is None else others_share(
        ticks, end, wall_s, num_cpus, ticks_per_s)
    conn.send((steps * batches * case[1] / wall_s, share))


def measure(
    frameworks: Sequence[str],
    cases: Sequence[Case],
    repeats: int,
    steps: int,
    warmup: int,
    scan_batches: int = 4,
    settle_s: float = 0.0,
    max_others_cpu: float = 1.0,
) -> tuple[dict[tuple[str, Case], list[float]], dict[str, str], dict[Case, tuple[int, int]]]:
  """Images/s per (framework, case), one sample per round; each framework's device.

  Each case runs ``repeats`` rounds; in a round every framework times one
  repeat, in turn. ``settle_s`` seconds of pause before each timed repeat
  keep one framework's busy-waiting threads (OpenMP, Eigen) from slowing the
  next one down. A round in which others took more than ``max_others_cpu``
  of the CPUs during a repeat is run again, up to ``repeats`` times per
  case; after that contended rounds are kept. Also returns, per case, the
  contended rounds (run again, kept).
  """
  ctx = mp.get_context('spawn')
  workers = {}
  for fw in frameworks:
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_worker, args=(fw, child, steps, warmup, scan_batches)
    )
    proc.start()
    workers[fw] = (proc, parent)
  devices = {fw: conn.recv() for fw, (_, conn) in workers.items()}
  samples: dict[tuple[str, Case], list[float]] = {}
  contended: dict[Case, tuple[int, int]] = {}
  try:
    for case in cases:
      rerun = kept_contended = 0
      while len(samples.get((frameworks[0], case), [])) < repeats:
        round_samples, quiet = {}, True
        for fw, (_, conn) in workers.items():
          # Lets the previous worker's spinning pool threads go idle.
          time.sleep(settle_s)
          conn.send(case)
          round_samples[fw], share = conn.recv()
          quiet &= share is None or share <= max_others_cpu
        if not quiet and rerun < repeats:
          rerun += 1
          continue
        kept_contended += not quiet
        for fw, value in round_samples.items():
          samples.setdefault((fw, case), []).append(value)
      contended[case] = (rerun, kept_contended)
  finally:
    for proc, conn in workers.values():
      if proc.is_alive():
        conn.send(None)
        proc.join(timeout=60)
      proc.terminate()
  return samples, devices, contended


def format_table(
    frameworks: Sequence[str],
    cases: Sequence[Case],
    samples: dict[tuple[str, Case], list[float]],
) -> str:
  """Markdown table of images/s, then each agejax row's ratio to each rival.

  Images/s are each framework's median over the rounds (`measure`). A
  ratio is the median over the rounds of the two frameworks' ratio within
  a round, followed by the lowest and highest of those in brackets: a
  round's repeats run back to back, so a machine that slows down for a
  while slows both sides of a round's ratio, where it can move one median
  and not the other. With more than one rival, a last row per agejax
  variant divides, round by round, by the fastest rival of that round
  (the issue's goal is against the faster of Keras and PyTorch).
  """
  header = [f'{mode} b{bs}' for mode, bs in cases]
  lines = [
      '| framework | ' + ' | '.join(header) + ' |',
      '|---' * (len(cases) + 1) + '|',
  ]
  for fw in frameworks:
    cells = [f'{statistics.median(samples[fw, c]):.0f}' for c in cases]
    lines.append(f'| {fw} | ' + ' | '.join(cells) + ' |')
  rivals = [fw for fw in frameworks if not fw.startswith('agejax')]
  groups = [(rival, [rival]) for rival in rivals]
  if len(rivals) > 1:
    groups.append(('fastest rival', rivals))
  for fw in frameworks:
    if not fw.startswith('agejax'):
      continue
    for name, group in groups:
      cells = []
      for c in cases:
        best = [max(rnd) for rnd in zip(*(samples[r, c] for r in group), strict=True)]
        ratios = [a / b for a, b in zip(samples[fw, c], best, strict=True)]
        cells.append(
            f'{statistics.median(ratios):.2f}x'
            f' ({min(ratios):.2f}-{max(ratios):.2f})'
        )
      lines.append(f'| {fw} / {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  host_malloc.reexec(_HOST_MALLOC.value)
  frameworks = list(_FRAMEWORKS.value)
  for fw in frameworks:
    if fw not in FRAMEWORKS:
      raise app.UsageError(f'Unknown framework {fw!r}; expected {FRAMEWORKS}.')
  cases: list[Case] = [('train', int(b)) for b in _BATCH_SIZES.value]
  if _EVAL_BATCH_SIZE.value:
    cases.append(('eval', _EVAL_BATCH_SIZE.value))
  samples, devices, contended = measure(
      frameworks,
      cases,
      _REPEATS.value,
      _STEPS.value,
      _WARMUP.value,
      _SCAN_BATCHES.value,
      _SETTLE_S.value,
      _MAX_OTHERS_CPU.value,
  )
  print('devices:', ', '.join(f'{fw} {device}' for fw, device in devices.items()))
  print(
      f'images/s, median of {_REPEATS.value} rounds of {_STEPS.value} steps;'
      ' ratios: median of the rounds (lowest-highest)'
  )
  print(
      f'contended rounds (others took > {_MAX_OTHERS_CPU.value:.0%} of the CPUs during'
      ' a repeat), run again / kept: '
      + ', '.join(f'{mode} b{bs} {r} / {k}' for (mode, bs), (r, k) in contended.items())
  )
  print(format_table(frameworks, cases, samples))


if __name__ == '__main__':
  app.run(main)
