"""launch/bench_original.py in cider_jax's own environment (no torch): its help, and the clear
errors a user gets without a checkout of the original or without torch. Timing the original
itself needs the original's environment (docs/performance.md has the commands and figures)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'bench_original.py')


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)


def test_help_explains_and_needs_no_torch():
  r = _run('--help')
  assert r.returncode == 0, r.stderr
  for words in ('--original_src', "original's own environment", 'ms_per_iter', 'launch/bench.py'):
    assert words in r.stdout, words


def test_a_folder_without_the_original_is_one_error_line(tmp_path):
  r = _run('--original_src', str(tmp_path))
  assert r.returncode != 0
  assert r.stderr.strip() == (f"error: --original_src '{tmp_path}' has no src/models.py: give a "
                              'checkout of the original CIDer code (GitHub gw-zhong/CIDer)')


def test_without_torch_it_says_which_environment(tmp_path):
  # cider_jax's environment has no torch (.ci/run checks it)
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'models.py').write_text('raise SystemExit("must not be imported")\n')
  r = _run('--original_src', str(tmp_path))
  assert r.returncode != 0
  assert "error: torch is not installed: run this in the original's environment" in r.stderr
