"""The README documents what the code defines, checked by reading both."""
from __future__ import annotations

import re

from harness.util import REPO_ROOT


def test_every_setting_is_in_the_readme_configuration_table():
    """Each fhir_sync.* setting src/gucs.rs registers has a row (or a place in a row) of the README's
    configuration table."""
    defined = set(re.findall(r'c"(fhir_sync\.[a-z_]+)"', (REPO_ROOT / "src" / "gucs.rs").read_text()))
    assert len(defined) > 30, defined
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("### Configuration", 1)[1].split("\n### ", 1)[0]
    rows = "\n".join(line for line in table.splitlines() if line.startswith("| `fhir_sync."))
    missing = sorted(name for name in defined if f"`{name}`" not in rows)
    assert missing == [], f"settings without a row in the README's configuration table: {missing}"
