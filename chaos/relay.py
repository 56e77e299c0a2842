"""A TCP relay that can black-hole traffic, as a dropped route or a changed
security group does: `black_hole()` stops passing bytes in both directions
without closing anything (new connections are accepted and then hear
nothing), `heal()` passes them again, in order, like TCP retransmitting
after the path comes back. No root needed: one thread in the caller's
process.

    with Relay("127.0.0.1", 5432) as relay:   # connect to 127.0.0.1:relay.port
        relay.black_hole()
        ...
        relay.heal()
"""

import selectors
import socket
import threading

CHUNK = 65536


class Relay:
    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.passing = True
        self.peers: dict[socket.socket, socket.socket] = {}  # each side -> the other
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=f"relay:{self.port}", daemon=True)
        self.thread.start()

    def black_hole(self) -> None:
        """Stop passing bytes; every connection stays open."""
        self.passing = False

    def heal(self) -> None:
        self.passing = True

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        for sock in [self.listener, *self.peers]:
            sock.close()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the relay's thread ------------------------------------------------------------

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            while not self.closing.is_set():
                # While black-holed nothing is read: the bytes wait in the
                # kernel's buffers (acknowledged, as by a middlebox), unanswered.
                watched = [self.listener, *(self.peers if self.passing else ())]
                for sock in watched:
                    selector.register(sock, selectors.EVENT_READ)
                ready = selector.select(timeout=0.05)
                for sock in watched:
                    selector.unregister(sock)
                for key, _ in ready:
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj in self.peers and self.passing:
                        self._pass(key.fileobj)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()  # the database itself refuses: so do we
            return
        client.setblocking(True)
        server.setblocking(True)
        self.peers[client], self.peers[server] = server, client

    def _pass(self, sock: socket.socket) -> None:
        other = self.peers[sock]
        try:
            data = sock.recv(CHUNK)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        for end in (sock, other):  # one side closed: close the other
            self.peers.pop(end, None)
            end.close()
