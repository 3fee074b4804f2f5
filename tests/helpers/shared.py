"""Where the project's shared reference material (the original's fixtures) lives."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CANDIDATES = (os.environ.get('CIDER_SHARED_DIR', ''), os.path.join(ROOT, '..', 'shared'),
              '/work/shared')


def fixtures_dir() -> str:
  """shared/fixtures: $CIDER_SHARED_DIR, the checkout's sibling `shared/`, or /work/shared."""
  for base in CANDIDATES:
    path = os.path.join(base, 'fixtures')
    if base and os.path.isdir(path):
      return os.path.abspath(path)
  raise FileNotFoundError('shared/fixtures not found in ' + ', '.join(c for c in CANDIDATES if c)
                          + '; set CIDER_SHARED_DIR to the folder holding fixtures/')
