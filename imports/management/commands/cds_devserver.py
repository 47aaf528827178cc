import asyncio
import contextlib
import logging
from pathlib import Path

import asyncssh
from django.core.management.base import BaseCommand, CommandError
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

DEFAULT_PORTS = {"ftp": 2121, "sftp": 2222}


class Command(BaseCommand):
    help = (
        "Serve a folder over FTP or SFTP on this machine, for demos and manual tests of CDS "
        "imports and exports."
    )

    def add_arguments(self, parser):
        parser.add_argument("--root", required=True, help="folder to serve")
        parser.add_argument("--protocol", choices=sorted(DEFAULT_PORTS), default="ftp")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, help="default: 2121 for FTP, 2222 for SFTP")
        parser.add_argument("--user", default="cds")
        parser.add_argument("--password", default="cds")
        parser.add_argument(
            "--host-key",
            help="SFTP: the server's private host key, made there if missing, so that the "
            "key stays the same across restarts (default: a new key every start)",
        )

    def handle(self, *args, root, protocol, host, port, user, password, host_key, **options):
        root_path = Path(root).expanduser().resolve()
        if not root_path.is_dir():
            raise CommandError(f"{root_path} is not a folder.")
        port = DEFAULT_PORTS[protocol] if port is None else port
        if protocol == "sftp":
            self.serve_sftp(root_path, host, port, user, password, host_key)
        else:
            self.serve_ftp(root_path, host, port, user, password)

    def serve_ftp(self, root: Path, host: str, port: int, user: str, password: str) -> None:
        authorizer = DummyAuthorizer()
        authorizer.add_user(user, password, str(root), perm="elradfmwMT")
        handler = type("DevHandler", (FTPHandler,), {"authorizer": authorizer})
        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
        try:
            server = FTPServer((host, port), handler)
        except OSError as exc:
            raise CommandError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None
        self.announce(f"ftp://{host}:{server.address[1]}/", root, user, password)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.close_all()

    def serve_sftp(
        self, root: Path, host: str, port: int, user: str, password: str, key_path: str | None
    ) -> None:
        key = self.host_key(key_path)

        class PasswordServer(asyncssh.SSHServer):
            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, offered: str) -> bool:
                return (username, offered) == (user, password)

        async def serve() -> None:
            try:
                server = await asyncssh.listen(
                    host,
                    port,
                    server_host_keys=[key],
                    server_factory=PasswordServer,
                    sftp_factory=lambda channel: asyncssh.SFTPServer(channel, chroot=bytes(root)),
                    allow_scp=False,
                )
            except OSError as exc:
                raise CommandError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None
            public = key.export_public_key("openssh").decode().strip()
            self.announce(f"sftp://{host}:{server.get_port()}/", root, user, password)
            self.stdout.write(
                f"Host key: {public}\nIts fingerprint: {key.get_fingerprint('sha256')}"
            )
            self.stdout.flush()
            await server.wait_closed()

        logging.getLogger("asyncssh").setLevel(logging.WARNING)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve())

    def host_key(self, path: str | None):
        if path is None:
            return asyncssh.generate_private_key("ssh-ed25519")
        key_file = Path(path).expanduser()
        if not key_file.exists():
            asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key_file))
            key_file.chmod(0o600)
        try:
            return asyncssh.read_private_key(str(key_file))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise CommandError(f"Cannot read the host key {key_file}: {exc}.") from None

    def announce(self, url: str, root: Path, user: str, password: str) -> None:
        self.stdout.write(
            f"Serving {root} on {url} (user {user!r}, password {password!r}). Stop with Ctrl-C."
        )
        self.stdout.flush()
