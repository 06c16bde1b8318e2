"""An upstream built on h11, an independent strict HTTP/1.1 implementation.

It prints its port, then one JSON line per event: every request it parsed (method, target,
headers, body) and every protocol error h11 raised. The Rust test decides what is acceptable.
"""
import json
import socket
import sys
import threading

import h11


def emit(record):
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def serve(sock):
    conn = h11.Connection(h11.SERVER)
    request, body = None, b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data:
                    event = conn.next_event()
                    if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                        return
                else:
                    continue
            if isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                emit({
                    "kind": "request",
                    "method": request.method.decode("latin-1"),
                    "target": request.target.decode("latin-1"),
                    "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers],
                    "body": body.decode("latin-1"),
                })
                payload = request.target
                sock.sendall(conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(payload)))])))
                sock.sendall(conn.send(h11.Data(data=payload)))
                sock.sendall(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except h11.RemoteProtocolError as e:
        emit({"kind": "protocol_error", "error": str(e)})
    except OSError:
        pass
    finally:
        sock.close()


def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    emit({"kind": "listening", "port": listener.getsockname()[1]})
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
