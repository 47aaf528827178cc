from django import forms

from .protocol import name_problem


class OutgoingFileForm(forms.Form):
    """A file for the partner, put into the outgoing spool of a source."""

    file = forms.FileField(label="File to send")

    def __init__(self, *args, source=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source

    def clean_file(self):
        upload = self.cleaned_data["file"]
        problem = name_problem(upload.name)
        if problem:
            raise forms.ValidationError(f"This file name cannot be sent: {problem}.")
        return upload

    def save(self) -> str | None:
        """Put the file into the outgoing spool's new/ and return its name; None, with the
        form's error, when that cannot be done."""
        upload = self.cleaned_data["file"]
        store = self.source.outgoing_store
        try:
            store.prepare()
            store.add_new(upload.name, upload.chunks())
        except FileExistsError:
            self.add_error("file", f"A file named {upload.name} waits to be sent already.")
            return None
        except OSError as exc:
            self.add_error("file", f"The file could not be stored: {exc.strerror or exc}.")
            return None
        return upload.name
