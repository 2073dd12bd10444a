"""What audience-sync serves over HTTP: the daemon's metrics and health, and the status page.

server        one port: /metrics, /healthz, and the status page at /
metrics       the daemon's Prometheus registry and its health
status_page   the read-only HTML view of the state database (Jinja2, no script)
charts        the page's inline SVG charts
auth          the page's access token: Bearer header or login cookie
serve         `audience-sync serve`: the page without a daemon
"""
