"""Container HEALTHCHECK: exit 0 when Triton answers 200 on the given health URL (no curl in slim images)."""

import sys
import urllib.request

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v2/health/ready"
try:
    with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - loopback health URL
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
    print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
