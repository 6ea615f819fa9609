"""Tests of experiments.regex_lists: separators count only at a regex's top level."""

import re

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized

from experiments import regex_lists


class SplitTopLevelTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('plain', 'a|b', '|', ('a', 'b')),
      ('group', 'a|b(c|d)', '|', ('a', 'b(c|d)')),
      ('class', '[|]x|y', '|', ('[|]x', 'y')),
      ('escaped', r'a\|b|c', '|', (r'a\|b', 'c')),
      ('nested_groups', '(a(b|c)|d)|e', '|', ('(a(b|c)|d)', 'e')),
      ('none', 'block1/.*', '|', ('block1/.*',)),
      ('entries', 'a:1:0.1:x,b:2:0.2:y', ',', ('a:1:0.1:x', 'b:2:0.2:y')),
      ('quantifier', r'a:1:0.1:block\d{1,2}/.*,b:2:0.2:y', ',',
       (r'a:1:0.1:block\d{1,2}/.*', 'b:2:0.2:y')),
      ('comma_in_group_and_class', 'a:1:0.1:(x,y)[,],b', ',',
       ('a:1:0.1:(x,y)[,]', 'b')),
      ('brace_inside_class', 'x[{],y', ',', ('x[{]', 'y')),
      ('trailing', 'a,', ',', ('a', '')),
  )
  def test_split(self, text, sep, want):
    self.assertEqual(regex_lists.split_top_level(text, sep), want)

  def test_each_part_of_a_quantified_pattern_compiles(self):
    for part in regex_lists.split_top_level(r'block\d{1,2}/.*|logits/(kernel|bias)', '|'):
      re.compile(part)


class RegexListFlagTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('two_entries', '--stages=a:1:1e-3:paper,b:2:1e-4:none',
       ['a:1:1e-3:paper', 'b:2:1e-4:none']),
      ('quantifier_stays', r'--stages=a:1:1e-3:block\d{1,2}/.*, b:2:1e-4:none',
       [r'a:1:1e-3:block\d{1,2}/.*', 'b:2:1e-4:none']),
      ('empty', '--stages=', []),
  )
  def test_parse(self, arg, want):
    values = flags.FlagValues()
    regex_lists.define_regex_list('stages', None, 'help', flag_values=values)
    values(['prog', arg])
    self.assertEqual(values.stages, want)

  def test_serialized_value_parses_back(self):
    values = flags.FlagValues()
    regex_lists.define_regex_list('stages', None, 'help', flag_values=values)
    values(['prog', r'--stages=a:1:1e-3:block\d{1,2}/.*,b:2:1e-4:none'])
    again = flags.FlagValues()
    regex_lists.define_regex_list('stages', None, 'help', flag_values=again)
    again(['prog', values['stages'].serialize()])
    self.assertEqual(again.stages, values.stages)


if __name__ == '__main__':
  absltest.main()
