"""Reading compiled HLO text in tests."""
import re


def _bytes(shape: str) -> int:
  m = re.match(r'[a-z]+(\d+)\[([\d,]*)\]', shape)
  n = 1
  for d in filter(None, m.group(2).split(',')):
    n *= int(d)
  return n * int(m.group(1)) // 8


def copy_bytes_around_calls(hlo: str, target: str) -> int:
  """Bytes of the copies (or copy-rooted fusions) in the entry computation that feed a custom
  call to `target` or copy one of its results: what XLA adds when it cannot run the call in
  place (copies are copy instructions and fusions rooted in a copy: XLA fuses a copy with
  the bitcasts around it)."""
  fused = {m.group(1) for m in re.finditer(
      r'\n%?([\w.\-]+) [^\n]*\{\n(?:[^\n]*\n)*?\s*ROOT [^\n]* copy\(', hlo)}
  entry = hlo[hlo.index('\nENTRY'):]
  defs, calls, results = {}, set(), set()
  for line in entry.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (.*)', line)
    if m:
      defs[m.group(1)] = m.group(2)
  for name, rest in defs.items():
    if f'custom_call_target="{target}"' in rest:
      calls.add(name)
  for name, rest in defs.items():
    g = re.match(r'\S+ get-tuple-element\(%([\w.\-]+)\)', rest)
    if g and g.group(1) in calls:
      results.add(name)

  def is_copy(rest):
    call = re.search(r'calls=%([\w.\-]+)', rest)
    return bool(re.match(r'\S+ copy\(', rest)) or (
        bool(re.match(r'\S+ fusion\(', rest)) and bool(call) and call.group(1) in fused)

  def operands(rest):
    return re.findall(r'%([\w.\-]+)', rest.split(', metadata')[0].split(', calls=')[0])

  copies = {n for n, rest in defs.items() if is_copy(rest)}
  around = {c for c in copies if results & set(operands(defs[c]))}
  around |= {o for c in calls for o in operands(defs[c]) if o in copies}
  return sum(_bytes(defs[c].split(' ')[0]) for c in around)
