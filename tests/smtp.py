"""A real SMTP server for the tests (aiosmtpd on 127.0.0.1), keeping what it received."""

import email
import email.policy
import socket

from aiosmtpd.controller import Controller


class SmtpServer:
    def __init__(self):
        self.received: list[email.message.EmailMessage] = []
        self.envelopes = []
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        self.received.append(
            email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        )
        return "250 Message accepted for delivery"

    def mailer(self) -> dict:
        """The MAILERS entry that sends to this server."""
        return {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": self.port, "timeout": 5},
        }

    def stop(self) -> None:
        self.controller.stop()
