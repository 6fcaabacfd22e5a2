#!/usr/bin/env python3
"""An HTTP proxy in front of moto that injects EC2 faults into RunInstances, for
tests/it/aws.rs:

    fault_proxy.py UPSTREAM_URL THROTTLES CAPACITY_TYPE CAPACITY_ERRORS [ALLOWED]

The first THROTTLES RunInstances calls get HTTP 503 RequestLimitExceeded (EC2's throttling
error); then the first CAPACITY_ERRORS calls asking for CAPACITY_TYPE get HTTP 400
InsufficientInstanceCapacity. With ALLOWED, the RunInstances calls after the first ALLOWED
that reach moto get HTTP 403 UnauthorizedOperation (a permission revoked mid-run).
Everything else goes to UPSTREAM_URL unchanged. Prints
"listening on PORT" once ready, one "injected CODE" line per fault, and for every
RunInstances passed on a "RunInstances k=v ..." line with its InstanceType and
InstanceMarketOptions parameters, all on stderr.
"""
import http.server
import sys
import urllib.error
import urllib.parse
import urllib.request

UPSTREAM, THROTTLES, CAP_TYPE, CAP_ERRORS = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ALLOWED = int(sys.argv[5]) if len(sys.argv) > 5 else None
state = {"throttled": 0, "capacity": 0, "passed": 0}


def error_xml(code, message):
    return (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error></Errors><RequestID>fault-{code}</RequestID></Response>").encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def forward(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        form = urllib.parse.parse_qs(body.decode("latin-1")) if body else {}
        if form.get("Action") == ["RunInstances"]:
            if state["throttled"] < THROTTLES:
                state["throttled"] += 1
                print("injected RequestLimitExceeded", file=sys.stderr, flush=True)
                return self.reply(503, error_xml("RequestLimitExceeded", "Request limit exceeded."))
            if form.get("InstanceType") == [CAP_TYPE] and state["capacity"] < CAP_ERRORS:
                state["capacity"] += 1
                print("injected InsufficientInstanceCapacity", file=sys.stderr, flush=True)
                return self.reply(400, error_xml("InsufficientInstanceCapacity",
                                                 f"We currently do not have sufficient {CAP_TYPE} capacity."))
            if ALLOWED is not None and state["passed"] >= ALLOWED:
                print("injected UnauthorizedOperation", file=sys.stderr, flush=True)
                return self.reply(403, error_xml("UnauthorizedOperation",
                                                 "You are not authorized to perform this operation."))
            state["passed"] += 1
            shown = sorted(f"{k}={v[0]}" for k, v in form.items()
                           if k == "InstanceType" or k.startswith("InstanceMarketOptions."))
            print("RunInstances " + " ".join(shown), file=sys.stderr, flush=True)
        req = urllib.request.Request(UPSTREAM + self.path, data=body if body else None, method=self.command)
        for k, v in self.headers.items():
            if k.lower() not in ("host", "content-length", "connection"):
                req.add_header(k, v)
        try:
            with urllib.request.urlopen(req) as r:
                self.reply(r.status, r.read(), r.getheaders())
        except urllib.error.HTTPError as e:
            self.reply(e.code, e.read(), e.headers.items())

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = forward


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on {srv.server_address[1]}", file=sys.stderr, flush=True)
srv.serve_forever()
