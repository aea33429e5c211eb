"""``import nnslim`` on platforms without POSIX-only modules."""

import subprocess
import sys


def test_import_works_where_resource_does_not_exist():
    # Windows has no ``resource``: a None entry in sys.modules makes its import fail the same way
    code = (
        "import sys; sys.modules['resource'] = None\n"
        "import nnslim\n"
        "from nnslim.large.stream import _peak_rss_mb\n"
        "assert _peak_rss_mb() is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
