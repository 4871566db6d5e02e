# prep-agent HA edge: Varnish 7.1 + varnish-modules (xkey) on each balancer, in
# FRONT of HAProxy (packaging/ha/README.md). Debian 12: /etc/varnish/default.vcl,
# varnishd listening on port 80 of every address (so it answers on the floating
# address when keepalived puts it on this balancer).
#
# Per-installation strings (prep_agent/rehearsal/edge.py replaces them verbatim):
#   "127.0.0.1" port "8081"   HAProxy's fe_origins (haproxy.cfg)
#   "10.0.0.0"/24             the origins, allowed to soft-purge (acl purgers)
vcl 4.1;

import std;
import xkey;

backend haproxy {
    .host = "127.0.0.1";
    .port = "8081";
    .connect_timeout = 1s;
    .first_byte_timeout = 10s;
    .between_bytes_timeout = 5s;
    # HAProxy answers 503 here when no origin is ready: Varnish then serves what
    # it holds from grace (the last cut) and does not wait on the origins.
    .probe = {
        .url = "/haproxy-edge-health";
        .interval = 500ms;
        .timeout = 1s;
        .window = 3;
        .threshold = 2;
    }
}

# Who may soft-purge (prep-agent's [purge] nodes sends it from each origin).
acl purgers {
    "127.0.0.1";
    "10.0.0.0"/24;
}

acl local {
    "127.0.0.1";
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(403, "Forbidden"));
        }
        if (!req.http.xkey-softpurge) {
            return (synth(400, "xkey-softpurge required"));
        }
        # Soft purge only: the old copy stays servable if the origins are down
        # (a hard purge would turn the next request into a 503).
        set req.http.n-gone = xkey.softpurge(req.http.xkey-softpurge);
        return (synth(200, "Softpurged " + req.http.n-gone));
    }
    # keepalived's check: this Varnish answers (not the origins: with every
    # origin down the cache must keep the floating address and serve the last cut).
    if (req.url == "/edge-health" && client.ip ~ local) {
        return (synth(200, "OK"));
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (synth(405, "Method Not Allowed"));
    }
    # Health and metrics are the origins' own business: monitor each origin
    # directly; from the public address they would all look like this balancer.
    if (req.url ~ "^/(health|livez|readyz|metrics)([?#]|$)") {
        return (synth(404, "Not Found"));
    }
    # Cache-busting defence: one object per path. The site has no query strings
    # and one name, so "?random", "/?x=...", any Host and any Accept-Encoding
    # end up on the same object and never reach an origin as a new one.
    set req.url = regsub(req.url, "[?#].*$", "");
    set req.http.Host = "prep";
    if (req.http.Accept-Encoding ~ "gzip") {
        set req.http.Accept-Encoding = "gzip";
    } else {
        unset req.http.Accept-Encoding;
    }
    unset req.http.Cookie;
    unset req.http.Authorization;
    # Stale copies are served while a fresh one is fetched in the background for
    # at most 10 s past max-age while the origins are reachable; when none is,
    # for as long as the object's grace (below): the last cut keeps being served.
    if (std.healthy(req.backend_hint)) {
        set req.grace = 10s;
    }
    return (hash);
}

sub vcl_backend_response {
    # A background refresh that failed keeps the stale copy (stale-if-error:
    # Varnish does not read that directive itself).
    if (beresp.status >= 500 && bereq.is_bgfetch) {
        return (abandon);
    }
    if (beresp.status != 200 && beresp.status != 304) {
        # Never cache an error: a release one origin lacks is found a moment later.
        set beresp.ttl = 0s;
        set beresp.uncacheable = true;
        return (deliver);
    }
    # TTL comes from the origin's max-age (pointers 5 s, releases one year);
    # grace from stale-while-revalidate. Keep every good object a day past it,
    # for when the origins are gone (req.grace above limits it while they are not).
    set beresp.grace = 24h;
    return (deliver);
}

sub vcl_backend_error {
    if (bereq.is_bgfetch) {
        return (abandon);
    }
}

sub vcl_deliver {
    # The xkey tags are for this cache only; the other tag headers stay for a
    # CDN in front (packaging/ha/README.md).
    unset resp.http.xkey;
    unset resp.http.Via;
    unset resp.http.X-Varnish;
}
