"""What audience-sync serves over HTTP: the daemon's metrics and health, the status page and the
run API.

server        one port: /metrics, /healthz, the status page at /, the run API at /api/runs
metrics       the daemon's Prometheus registry and its health
status_page   the read-only HTML view of the state database (Jinja2, no script)
charts        the page's inline SVG charts
auth          the page's access token: Bearer header or login cookie
api           POST /api/runs, GET /api/runs/<id>: runs a data pipeline asks for (Bearer token)
serve         `audience-sync serve`: the page without a daemon
"""
