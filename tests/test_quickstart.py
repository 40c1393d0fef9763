"""The quick start runs end to end and prints one row per method."""

import re

from examples import quickstart


def test_quickstart(capsys):
  quickstart.main()
  out = capsys.readouterr().out
  rows = {m: re.search(rf"^{re.escape(m)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
          for m in ("optax.adamw", "spd_optax.adam_spd")}
  assert all(rows.values()), out
  for m in rows.values():
    new_task, old_task, dist = map(float, m.groups())
    assert new_task > 0.85 and 0 < old_task <= 1 and dist > 0
  assert "of leaves decayed" in out
