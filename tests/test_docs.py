"""The project stands on its own: no file refers to notes or papers kept outside the repository, and every relative
Markdown link (README, docs/, model cards, any Markdown file added later) resolves to a file of the repository and,
for ``#anchors`` into Markdown files, to one of its headings (GitHub's slug rules)."""
import os
import re
import subprocess
import urllib.parse
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKED_SUFFIXES = ('.py', '.md', '.yaml', '.yml', '.toml', '.sh', '.cfg', '.txt', '.json')
CHECKED_NAMES = ('Makefile', 'run')  # run: the CI script .ci/run
# Spelled in two pieces so that this file does not match its own patterns.
OUTSIDE_REFERENCES = re.compile('|'.join([
    r'\b' + 'DESIGN' + r'\.md\b',         # the design notes kept beside the repository
    r'(?<![\w./-])' + 'papers' + '/',     # the folder of source papers (not a path segment of a URL)
]))
DOCS_MENTION = re.compile(r'(?<![\w./-])(docs/[\w./-]*\.md)(?:#([^\s`\'")\],;]+))?')

_FENCE = re.compile(r'^\s{0,3}(```|~~~)')
_INLINE_CODE = re.compile(r'(`+)(?:(?!\1).)+?\1')
_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_REFERENCE_DEFINITION = re.compile(r'^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$')
_HTML_ANCHOR = re.compile(r'<a\s[^>]*(?:name|id)="([^"]+)"', re.IGNORECASE)
_ATX_HEADING = re.compile(r'^\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$')
_SETEXT_UNDERLINE = re.compile(r'^\s{0,3}(=+|-+)\s*$')
_SCHEME = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*:')


def project_files(root: str) -> List[str]:
    """Repository-relative paths of the files git tracks or would track (untracked but not ignored)."""
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sorted(p for p in set(out.split('\0')) if p and os.path.isfile(os.path.join(root, p)))


def checked_files(root: str) -> List[str]:
    return [p for p in project_files(root) if p.endswith(CHECKED_SUFFIXES) or os.path.basename(p) in CHECKED_NAMES]


def outside_references(root: str, paths: List[str]) -> List[str]:
    """``path:line: text`` of every line referring to the design notes or the paper folder."""
    hits = []
    for path in paths:
        with open(os.path.join(root, path), encoding='utf-8', errors='replace') as f:
            hits += [f'{path}:{n}: {line.strip()}' for n, line in enumerate(f, 1) if OUTSIDE_REFERENCES.search(line)]
    return hits


def _strip_front_matter(lines: List[str]) -> List[str]:
    if lines and lines[0].strip() == '---':
        for i in range(1, len(lines)):
            if lines[i].strip() == '---':
                return [''] * (i + 1) + lines[i + 1:]  # keep line numbers
    return lines


def markdown_lines(text: str) -> Iterator[Tuple[int, str]]:
    """``(line number, line)`` outside YAML front matter and fenced code blocks."""
    fence = None
    for n, line in enumerate(_strip_front_matter(text.split('\n')), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            yield n, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text lowercased, punctuation and symbols dropped (letters of
    any script, digits, ``_``, ``-`` and spaces kept), spaces turned into ``-``."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link or image counts by its text
    text = re.sub(r'<[^>]+>', '', text)  # HTML tags
    return re.sub(r'[^\w\- ]', '', text.strip().lower()).replace(' ', '-')


def heading_anchors(text: str) -> Set[str]:
    """Every anchor of a Markdown document: heading slugs (repeats numbered ``-1``, ``-2``… as on GitHub) and
    explicit HTML ``<a name=…>`` / ``id=…`` anchors."""
    anchors: Set[str] = set()
    seen: Dict[str, int] = {}
    previous = ''
    for _, line in markdown_lines(text):
        heading = None
        atx = _ATX_HEADING.match(line)
        if atx:
            heading = atx.group(1)
        elif _SETEXT_UNDERLINE.match(line) and previous.strip() and not re.match(r'\s*([-*+>|#]|\d+[.)])', previous):
            heading = previous.strip()
        if heading is not None:
            slug = github_slug(heading)
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f'{slug}-{count}')
        anchors.update(_HTML_ANCHOR.findall(line))
        previous = line
    return anchors


def markdown_links(text: str) -> Iterator[Tuple[int, str]]:
    """``(line number, target)`` of every inline link, image and reference definition outside code."""
    for n, line in markdown_lines(text):
        definition = _REFERENCE_DEFINITION.match(line)
        if definition:
            yield n, definition.group(1)
            continue
        for target in _LINK.findall(_INLINE_CODE.sub('', line)):
            yield n, target


def _anchor_problem(root: str, file_path: str, anchor: str) -> str:
    """'' when ``anchor`` is a heading of the Markdown file ``file_path``, else why not."""
    with open(file_path, encoding='utf-8') as f:
        anchors = heading_anchors(f.read())
    if anchor in anchors or anchor.lower() in anchors:
        return ''
    return f'no heading #{anchor} in {os.path.relpath(file_path, root)}'


def resolve_link(root: str, source: str, target: str) -> str:
    """'' when the relative ``target`` written in the repository file ``source`` resolves, else why not.
    Absolute URLs (any scheme, ``//host``) are not checked."""
    if _SCHEME.match(target) or target.startswith('//'):
        return ''
    path, _, anchor = target.partition('#')
    path = urllib.parse.unquote(path.split('?', 1)[0])
    anchor = urllib.parse.unquote(anchor)
    base = os.path.join(root, os.path.dirname(source))
    resolved = os.path.normpath(os.path.join(root, path.lstrip('/')) if path.startswith('/') else
                                os.path.join(base, path)) if path else os.path.join(root, source)
    if os.path.relpath(resolved, root).startswith(os.pardir):
        return f'{target} points outside the repository'
    if not os.path.exists(resolved):
        return f'{target}: no such file {os.path.relpath(resolved, root)}'
    if anchor and resolved.endswith('.md') and os.path.isfile(resolved):
        return _anchor_problem(root, resolved, anchor)
    return ''


def broken_links(root: str, markdown_paths: List[str]) -> List[str]:
    problems = []
    for source in markdown_paths:
        with open(os.path.join(root, source), encoding='utf-8') as f:
            text = f.read()
        for n, target in markdown_links(text):
            problem = resolve_link(root, source, target)
            if problem:
                problems.append(f'{source}:{n}: {problem}')
    return problems


def broken_docs_mentions(root: str, paths: List[str]) -> List[str]:
    """Plain-text mentions of ``docs/….md[#anchor]`` (code comments, docstrings, cards) that do not resolve from the
    repository root."""
    problems = []
    for path in paths:
        with open(os.path.join(root, path), encoding='utf-8', errors='replace') as f:
            for n, line in enumerate(f, 1):
                for doc, anchor in DOCS_MENTION.findall(line):
                    target = doc + ('#' + anchor.rstrip('.:') if anchor else '')
                    problem = resolve_link(root, '', target)
                    if problem:
                        problems.append(f'{path}:{n}: {problem}')
    return problems


# -- the repository ---------------------------------------------------------------------------------------------------
def test_no_project_file_refers_to_the_design_notes_or_the_paper_folder():
    files = checked_files(REPO)
    assert 'odenet_timm/models/hamiltonian.py' in files and 'README.md' in files and 'configs/digits_resnet.yaml' in files
    hits = outside_references(REPO, files)
    assert not hits, 'cite papers by title and arXiv id, and the project docs (docs/) instead:\n' + '\n'.join(hits)


def test_every_relative_markdown_link_resolves():
    markdown = [p for p in project_files(REPO) if p.endswith('.md')]
    assert {'README.md', 'docs/models.md', 'docs/protocol.md', 'model_cards/inresnet_110.md'} <= set(markdown)
    problems = broken_links(REPO, markdown)
    assert not problems, '\n'.join(problems)


def test_every_mention_of_a_docs_page_in_code_and_cards_resolves():
    this_file = os.path.relpath(__file__, REPO)  # its checker tests mention pages of a made-up repository
    problems = broken_docs_mentions(REPO, [p for p in checked_files(REPO) if p != this_file])
    assert not problems, '\n'.join(problems)


def test_readme_links_the_model_and_protocol_docs():
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        targets = {target for _, target in markdown_links(f.read())}
    assert 'docs/models.md' in targets and 'docs/protocol.md' in targets


def test_model_cards_cite_their_paper_by_title_and_arxiv_id_and_point_to_the_docs():
    cards = sorted(p for p in project_files(REPO) if p.startswith('model_cards/') and p.endswith('.md'))
    assert len(cards) >= 26
    for card in cards:
        with open(os.path.join(REPO, card), encoding='utf-8') as f:
            text = f.read()
        paper = text.split('## Paper\n', 1)[1].split('\n## ', 1)[0]
        assert re.search(r'- "[^"]+", arXiv:\d{4}\.\d{4,5} — https://arxiv\.org/abs/\d{4}\.\d{4,5}', paper), card
        assert '`docs/models.md` of the odenet_timm repository' in text, card


# -- the checker itself -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('heading, slug', [
    ('Implicit θ-ResNets', 'implicit-θ-resnets'),
    ('Hamiltonian, MidPoint and Leapfrog networks', 'hamiltonian-midpoint-and-leapfrog-networks'),
    ("Paper, authors' code and our reading", 'paper-authors-code-and-our-reading'),
    ('`model.solver_stats()` & co', 'modelsolver_stats--co'),
    ('See [the docs](docs/models.md) now', 'see-the-docs-now'),
    ('In-ResNet family', 'in-resnet-family'),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_heading_anchors_number_repeats_and_skip_code_and_front_matter():
    text = ('---\ntitle: x\n---\n# Top\n## Usage\n```bash\n# not a heading\n```\n## Usage\n'
            'Setext title\n------------\n<a name="custom"></a>\n')
    assert heading_anchors(text) == {'top', 'usage', 'usage-1', 'setext-title', 'custom'}


def test_checker_reports_missing_files_anchors_escapes_and_outside_references(tmp_path):
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'a.md').write_text(
        '# Alpha\n\n## Beta section\n\nsee [b](#beta-section), [up](../README.md#intro), [gone](missing.md), '
        '[bad anchor](#gamma), [out](../../elsewhere.md), [web](https://example.org/x.md#nowhere), '
        '`[code](ignored.md)`\n\n```\n[fenced](ignored.md)\n```\n[ref]: ../README.md#nope\n')
    (tmp_path / 'README.md').write_text('# Intro\n\n![img](docs/a.md#alpha)\n')
    (tmp_path / 'mod.py').write_text('"""See docs/a.md#beta-section and docs/a.md#delta."""\n'
                                     '# equations in ' + 'DESIGN' + '.md §3, ``' + 'papers' + '/x.md``\n'
                                     'URL = "https://example.org/' + 'papers' + '/x"\n')
    problems = broken_links(str(tmp_path), ['README.md', 'docs/a.md'])
    assert problems == [
        'docs/a.md:5: missing.md: no such file docs/missing.md',
        'docs/a.md:5: no heading #gamma in docs/a.md',
        'docs/a.md:5: ../../elsewhere.md points outside the repository',
        'docs/a.md:10: no heading #nope in README.md',
    ]
    assert broken_docs_mentions(str(tmp_path), ['mod.py']) == ['mod.py:1: no heading #delta in docs/a.md']
    assert [hit.split(':')[1] for hit in outside_references(str(tmp_path), ['mod.py', 'README.md'])] == ['2']
