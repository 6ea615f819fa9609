"""Tests for benchmarks.frameworks: the table's medians and paired ratios, the load record, the device record."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized

from benchmarks import frameworks


class FormatTableTest(absltest.TestCase):

  def test_ratio_is_the_median_of_each_rounds_ratio(self):
    # The machine slows down in rounds 2 and 3 for both frameworks. The
    # rounds' own ratios are 1.25, 1.25 and 1.5; the medians' ratio, 150 /
    # 100, would pair round 3's agejax with round 2's or 3's torch.
    case = ('train', 64)
    samples = {
        ('agejax-auto', case): [250.0, 125.0, 150.0],
        ('torch', case): [200.0, 100.0, 100.0],
    }
    table = frameworks.format_table(['agejax-auto', 'torch'], [case], samples)
    self.assertEqual(
        table.splitlines(),
        [
            '| framework | train b64 |',
            '|---|---|',
            '| agejax-auto | 150 |',
            '| torch | 100 |',
            '| agejax-auto / torch | 1.25x (1.25-1.50) |',
        ],
    )

  def test_only_agejax_rows_get_ratios(self):
    case = ('eval', 256)
    samples = {
        ('torch', case): [1.0],
        ('keras', case): [2.0],
        ('agejax-bf16', case): [4.0],
    }
    lines = frameworks.format_table(
        ['torch', 'keras', 'agejax-bf16'], [case], samples
    ).splitlines()
    self.assertEqual(
        lines[-3:],
        [
            '| agejax-bf16 / torch | 4.00x (4.00-4.00) |',
            '| agejax-bf16 / keras | 2.00x (2.00-2.00) |',
            '| agejax-bf16 / fastest rival | 2.00x (2.00-2.00) |',
        ],
    )

  def test_fastest_rival_is_chosen_round_by_round(self):
    # torch is faster in round 1, keras in rounds 2 and 3: the rounds'
    # ratios against the fastest are 300 / 200, 300 / 250 and 300 / 150.
    case = ('train', 64)
    samples = {
        ('agejax-auto', case): [300.0, 300.0, 300.0],
        ('torch', case): [200.0, 100.0, 100.0],
        ('keras', case): [150.0, 250.0, 150.0],
    }
    lines = frameworks.format_table(
        ['agejax-auto', 'torch', 'keras'], [case], samples
    ).splitlines()
    self.assertEqual(
        lines[-1], '| agejax-auto / fastest rival | 1.50x (1.20-2.00) |'
    )

  def test_one_rival_gets_no_fastest_row(self):
    case = ('train', 64)
    samples = {('agejax-auto', case): [2.0], ('torch', case): [1.0]}
    table = frameworks.format_table(['agejax-auto', 'torch'], [case], samples)
    self.assertNotIn('fastest', table)


class OthersShareTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # (busy, steal, own) ticks at the start and at the end of a 1 s repeat
      # on 2 CPUs at 100 ticks/s: 200 ticks of CPU time in all.
      ('alone', (1000, 0, 500), (1200, 0, 700), 0.0),
      ('another_process_took_half_a_core', (1000, 0, 500), (1200, 0, 650), 0.25),
      ('the_hypervisor_stole_20_ticks', (1000, 5, 500), (1180, 25, 680), 0.1),
      # Tick sampling can give the process a tick more than all CPUs' busy time.
      ('rounding_is_not_negative', (1000, 0, 500), (1199, 0, 700), 0.0),
  )
  def test_share(self, start, end, want):
    self.assertAlmostEqual(frameworks.others_share(start, end, 1.0, 2, 100), want)

  def test_reads_this_machine(self):
    ticks = frameworks.cpu_ticks()
    if ticks is None:
      self.skipTest('no /proc/stat here')
    busy, steal, own = ticks
    self.assertGreaterEqual(busy, own)
    self.assertGreaterEqual(steal, 0)
    sum(range(3_000_000))  # a little CPU time of its own
    self.assertGreater(frameworks.cpu_ticks()[2], own)


class RivalEnvironmentTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('default_torch_drops_an_exported_policy', 'torch',
       {'PATH': '/bin', 'OMP_WAIT_POLICY': 'PASSIVE'}, {'PATH': '/bin'}),
      ('passive_torch', 'torch-passive', {'PATH': '/bin'},
       {'PATH': '/bin', 'OMP_WAIT_POLICY': 'PASSIVE'}),
      ('default_keras_drops_exported_onednn', 'keras',
       {'TF_ENABLE_ONEDNN_OPTS': '1'}, {}),
      ('onednn_keras_overrides_an_exported_0', 'keras-onednn',
       {'TF_ENABLE_ONEDNN_OPTS': '0'}, {'TF_ENABLE_ONEDNN_OPTS': '1'}),
      ('agejax_keeps_other_variables', 'agejax-auto',
       {'XLA_FLAGS': '--x', 'OMP_WAIT_POLICY': 'ACTIVE'}, {'XLA_FLAGS': '--x'}),
  )
  def test_environment(self, framework, environ, want):
    self.assertEqual(frameworks.rival_environment(framework, environ), want)

  def test_every_tuned_variant_is_a_framework(self):
    self.assertContainsSubset(frameworks.RIVAL_ENV, frameworks.FRAMEWORKS)


class DeviceTest(absltest.TestCase):

  def test_agejax_reports_its_default_device(self):
    self.assertEqual(frameworks.device_of('agejax-auto'), 'cpu (cpu)')


if __name__ == '__main__':
  absltest.main()
