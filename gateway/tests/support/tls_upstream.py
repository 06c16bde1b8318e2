"""A TLS upstream for tests: Python's http.server behind Python's ssl.

Usage: tls_upstream.py CERT KEY [CLIENT_CA]. Prints its port, then answers every GET with a
JSON body naming what it saw: the Host header, the SNI name, the path, and the subject of the
client certificate (required when CLIENT_CA is given)."""

import http.server
import json
import socketserver
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        peer = self.connection.getpeercert() or {}
        subject = ",".join(
            f"{k}={v}" for rdn in peer.get("subject", ()) for (k, v) in rdn
        )
        body = json.dumps(
            {
                "host": self.headers.get("Host"),
                "sni": getattr(self.connection, "sni_name", None),
                "path": self.path,
                "client": subject,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Failed handshakes are the point of some tests: say so briefly.
        print(f"upstream: {sys.exc_info()[1]}", file=sys.stderr, flush=True)


def remember_sni(sock, name, _ctx):
    sock.sni_name = name


def main():
    cert, key = sys.argv[1], sys.argv[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = remember_sni
    if len(sys.argv) > 3:
        ctx.load_verify_locations(sys.argv[3])
        ctx.verify_mode = ssl.CERT_REQUIRED
    server = Server(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


main()
