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
      ('bracket_first_in_class', '[]|]x|y', '|', ('[]|]x', 'y')),
      ('bracket_first_in_negated_class', '[^],]x,y', ',', ('[^],]x', 'y')),
      ('escaped_bracket_in_class', r'[\],]x,y', ',', (r'[\],]x', 'y')),
      ('trailing', 'a,', ',', ('a', '')),
  )
  def test_split(self, text, sep, want):
    parts = regex_lists.split_top_level(text, sep)
    self.assertEqual(parts, want)
    self.assertEqual(sep.join(parts), text)

  def test_quantified_alternatives_stay_whole(self):
    parts = regex_lists.split_top_level(r'block\d{1,2}/.*|logits/(kernel|bias)', '|')
    self.assertEqual(parts, (r'block\d{1,2}/.*', 'logits/(kernel|bias)'))
    self.assertTrue(re.fullmatch(parts[0], 'block12/conv1/kernel'))

  @parameterized.named_parameters(
      ('brace', 'a{,b', "missing '}'"),
      ('group_and_brace', '(a{1,b', "missing '})'"),
      ('class', 'a[,b', "missing ']'"),
  )
  def test_unclosed_raises(self, text, message):
    with self.assertRaisesWithLiteralMatch(
        ValueError, f'{text!r} has an unclosed bracket ({message}).'):
      regex_lists.split_top_level(text, ',')


class EntriesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('plain', 'a, b ,c', ['a', 'b', 'c']),
      ('quantifier', r'a:1:0.1:x\d{1,2},b', [r'a:1:0.1:x\d{1,2}', 'b']),
      ('quoted_comma', '"--manual_dir=/data, v2",--batch_size=64',
       ['--manual_dir=/data, v2', '--batch_size=64']),
      ('quoted_quote', '"say ""hi"", then",x', ['say "hi", then', 'x']),
      ('quoted_last', 'x, "y,z" ', ['x', 'y,z']),
      ('empty_entry', 'a,,b', ['a', '', 'b']),
  )
  def test_split(self, argument, want):
    self.assertEqual(regex_lists.split_entries(argument), want)

  @parameterized.named_parameters(
      ('unclosed_quote', '"a,b', 'unclosed quote'),
      ('text_after_quote', '"a"b,c', 'text after a closing quote'),
      ('unclosed_bracket', 'a{1,b', 'unclosed bracket'),
  )
  def test_split_raises(self, argument, message):
    with self.assertRaisesRegex(ValueError, message):
      regex_lists.split_entries(argument)

  @parameterized.named_parameters(
      ('plain', ['a', 'b']),
      ('regex', [r'a:1:0.1:x\d{1,2}/.*', 'b:2:0.1:(c|d)']),
      ('comma_path', ['--manual_dir=/data, v2', '--batch_size=64']),
      ('quotes_and_spaces', ['say "hi"', ' padded ', 'a{']),
      ('empty_entries', ['', 'a', '']),
  )
  def test_join_reads_back(self, entries):
    self.assertEqual(regex_lists.split_entries(regex_lists.join_entries(entries)), entries)

  def test_join_quotes_only_what_needs_it(self):
    self.assertEqual(
        regex_lists.join_entries([r'x\d{1,2}', 'a, b']), r'x\d{1,2},"a, b"'
    )


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

  def test_unclosed_bracket_is_a_flag_error(self):
    values = flags.FlagValues()
    regex_lists.define_regex_list('stages', None, 'help', flag_values=values)
    with self.assertRaisesRegex(flags.IllegalFlagValueError, 'unclosed bracket'):
      values(['prog', '--stages=a:1:1e-3:block{1,b:1:1e-4:none'])

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
