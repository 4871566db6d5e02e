"""The opt-in firewall of the shipped nginx site (ModSecurity + CRS), for tests and benchmarks.

``enable_waf`` turns it on in a site made by ``tests/nginxkit.instantiate`` as an
admin would (packaging/nginx/README.md). Standard library only, so the
benchmarks import it too.
"""

from __future__ import annotations

from pathlib import Path

MODSECURITY_MODULE = Path("/usr/lib/nginx/modules/ngx_http_modsecurity_module.so")
PACKAGING = Path(__file__).resolve().parents[1] / "packaging"


def enable_waf(conf: Path) -> Path:
    """Enable the shipped firewall in a site made by ``nginxkit.instantiate``.

    As an admin would: the shipped snippet in the site's nginx-waf folder, the
    shipped rules and exclusions (their /etc paths replaced by the test's), and
    the module loaded by the main config (Debian's modules-enabled does that).
    Return the folder of the rules.
    """
    folder = conf.parent
    rules = folder / "modsecurity"
    rules.mkdir(exist_ok=True)
    (folder / "waf").mkdir(exist_ok=True)
    subs = {
        "/usr/share/prep-agent/modsecurity/prep-agent.conf": str(rules / "prep-agent.conf"),
        "/usr/share/prep-agent/modsecurity/exclusions.conf": str(rules / "exclusions.conf"),
    }
    for source, target in (
        (PACKAGING / "nginx" / "prep-agent-waf.conf", folder / "waf" / "prep-agent-waf.conf"),
        (PACKAGING / "modsecurity" / "prep-agent.conf", rules / "prep-agent.conf"),
        (PACKAGING / "modsecurity" / "exclusions.conf", rules / "exclusions.conf"),
    ):
        text = source.read_text()
        for old, new in subs.items():
            text = text.replace(old, new)
        target.write_text(text)
    main = conf.read_text()
    if "load_module" not in main:
        conf.write_text(f"load_module {MODSECURITY_MODULE};\n{main}")
    return rules
