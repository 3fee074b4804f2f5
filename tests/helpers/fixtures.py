"""The original's reference fixtures, kept in the repository (tests/fixtures, docs/model.md §6)."""
import os

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'fixtures')
MODEL_FIXTURE_NAMES = ('aligned_binary_cross.npz', 'aligned_seven.npz', 'unaligned_binary.npz',
                       'unaligned_seven_1head_4layers.npz')
MACI_FIXTURE = 'maci_bias.npz'


def fixture_path(name: str) -> str:
  """The path of tests/fixtures/`name`; FileNotFoundError if it is missing (never a skip)."""
  path = os.path.join(FIXTURES_DIR, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing from the repository (tests/fixtures/README.md)')
  return path


def model_fixtures() -> list:
  """The paths of the four model fixtures, sorted by name; all must be present."""
  return [fixture_path(name) for name in MODEL_FIXTURE_NAMES]
