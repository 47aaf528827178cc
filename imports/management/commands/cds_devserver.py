import logging
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


class Command(BaseCommand):
    help = "Serve a folder over FTP on this machine, for demos and manual tests of CDS imports."

    def add_arguments(self, parser):
        parser.add_argument("--root", required=True, help="folder to serve")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=2121)
        parser.add_argument("--user", default="cds")
        parser.add_argument("--password", default="cds")

    def handle(self, *args, root, host, port, user, password, **options):
        root_path = Path(root).expanduser().resolve()
        if not root_path.is_dir():
            raise CommandError(f"{root_path} is not a folder.")
        authorizer = DummyAuthorizer()
        authorizer.add_user(user, password, str(root_path), perm="elradfmwMT")
        handler = type("DevHandler", (FTPHandler,), {"authorizer": authorizer})
        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
        try:
            server = FTPServer((host, port), handler)
        except OSError as exc:
            raise CommandError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None
        self.stdout.write(
            f"Serving {root_path} on ftp://{host}:{server.address[1]}/ "
            f"(user {user!r}, password {password!r}). Stop with Ctrl-C."
        )
        self.stdout.flush()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.close_all()
