"""The documentation: every Markdown link in README.md and docs/*.md resolves (a relative link to
a file that exists, an #anchor to a heading of its page under GitHub's rules), and every path of
this repository a page names in backticks exists. External links are allowed, not checked."""

import functools
import glob
import os
import re

from helpers import ROOT

PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
_FENCE = re.compile(r'^\s*(```|~~~)')
_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_CODE_SPAN = re.compile(r'(`+)(.+?)\1')
# Repository paths as pages name them: `monoformer_jax/nn/model.py`, `tests/helpers.py`,
# `configs/imagenet256.py:h100x8`, `tests/x.py::test_y`. Placeholders in capitals (FILE, DIR)
# are not paths.
_REPO_PATH = re.compile(r'^(?:monoformer_jax|tests|configs|launch|docs|\.ci)/[a-z0-9_./-]*$')


def _prose_lines(text: str):
  """The lines outside fenced code blocks."""
  inside = False
  for line in text.splitlines():
    if _FENCE.match(line):
      inside = not inside
      continue
    if not inside:
      yield line


def slug(heading: str) -> str:
  """GitHub's anchor for a heading's text: markup and links reduced to their text, lowercase,
  every character but letters, digits, spaces, '-' and '_' dropped, spaces to '-'."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link is its text
  text = re.sub(r'<[^>]+>', '', text).strip().lower()
  text = ''.join(c for c in text if c.isalnum() or c in ' -_')
  return text.replace(' ', '-')


@functools.lru_cache(maxsize=None)
def anchors(path: str) -> frozenset:
  """The anchors of a page's headings, repeated ones numbered as GitHub numbers them."""
  seen, out = {}, set()
  for line in _prose_lines(open(path, encoding='utf-8').read()):
    heading = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if heading:
      base = slug(heading.group(1))
      out.add(base if base not in seen else f'{base}-{seen[base]}')
      seen[base] = seen.get(base, 0) + 1
  return frozenset(out)


def link_problems(path: str) -> list[str]:
  """'PAGE: TARGET (why)' for each link of a page that does not resolve."""
  problems = []
  for line in _prose_lines(open(path, encoding='utf-8').read()):
    for target in _LINK.findall(_CODE_SPAN.sub('', line)):
      if re.match(r'^(https?:|mailto:)', target):
        continue
      file_part, _, anchor = target.partition('#')
      page = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
      if not os.path.exists(page):
        problems.append(f'{os.path.relpath(path, ROOT)}: {target} (no file {file_part})')
      elif anchor and (not page.endswith('.md') or anchor not in anchors(page)):
        problems.append(f'{os.path.relpath(path, ROOT)}: {target} (no heading #{anchor} there)')
  return problems


def path_problems(path: str, root: str = ROOT) -> list[str]:
  """'PAGE: PATH' for each repository path a page names in backticks that does not exist."""
  problems = []
  for line in _prose_lines(open(path, encoding='utf-8').read()):
    for _, span in _CODE_SPAN.findall(line):
      name = span.strip().split('::')[0].split(':')[0]
      if _REPO_PATH.match(name) and not os.path.exists(os.path.join(root, name)):
        problems.append(f'{os.path.relpath(path, ROOT)}: {name}')
  return problems


def test_every_link_resolves():
  problems = [p for page in PAGES for p in link_problems(page)]
  assert not problems, 'links that do not resolve:\n' + '\n'.join(problems)


def test_every_named_path_exists():
  problems = [p for page in PAGES for p in path_problems(page)]
  assert not problems, 'paths that do not exist:\n' + '\n'.join(problems)


def test_the_checks_find_what_is_broken(tmp_path):
  """A planted broken link, anchor and path are found (the checks can fail), and what is right
  passes: GitHub's slugs of headings with code, punctuation and repeats, links in code ignored."""
  (tmp_path / 'other.md').write_text('# Other\n\n## The `sample` command: flags\n\n## Repeat\n\n'
                                     '## Repeat\n')
  page = tmp_path / 'page.md'
  page.write_text(
      '# Page\n\n## Fine, isn\'t it?\n\n'
      '[ok](other.md) [ok](other.md#the-sample-command-flags) [ok](other.md#repeat-1) '
      '[ok](#fine-isnt-it) [ok](https://example.org/x#y) `[not a link](nowhere.md)`\n\n'
      '```bash\n# a comment, not a heading\n[in code](nowhere.md)\n```\n\n'
      '[bad file](missing.md) [bad anchor](other.md#nothing) [bad here](#a-comment-not-a-heading)\n'
      '`monoformer_jax/train.py` `configs/digits.py:arg` `tests/test_docs.py::test_x` '
      '`configs/FILE.py` `monoformer_jax/no_such_module.py`\n')
  assert sorted(link_problems(str(page))) == sorted([
      f'{os.path.relpath(page, ROOT)}: missing.md (no file missing.md)',
      f'{os.path.relpath(page, ROOT)}: other.md#nothing (no heading #nothing there)',
      f'{os.path.relpath(page, ROOT)}: #a-comment-not-a-heading '
      '(no heading #a-comment-not-a-heading there)'])
  assert path_problems(str(page)) == [f'{os.path.relpath(page, ROOT)}: monoformer_jax/no_such_module.py']
