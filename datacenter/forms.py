from crispy_forms.helper import FormHelper
from crispy_forms.layout import Submit
from django import forms

from .processing import MODES


def form_helper(submit_label: str, method: str = "post") -> FormHelper:
    helper = FormHelper()
    helper.form_method = method
    helper.add_input(Submit("submit", submit_label))
    return helper


#: What the file inputs offer to choose: CSV files and workbooks.
ACCEPTED_FILES = ".csv,.xlsx,.xls,.ods,text/csv"


class UploadForm(forms.Form):
    file = forms.FileField(
        label="CSV file or workbook",
        help_text="A CSV file as spreadsheet programs save it (UTF-8, UTF-16 or Windows-1252; "
        "comma, semicolon or tab), or a workbook (.xlsx, .xls, .ods), of which the first "
        "sheet is taken. Its first row names the columns.",
        widget=forms.ClearableFileInput(attrs={"accept": ACCEPTED_FILES}),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.helper = form_helper("Upload")
        self.helper.form_tag = True


class ReplaceForm(forms.Form):
    file = forms.FileField(
        label="Corrected CSV file or workbook",
        help_text="It takes the place of the pending file (a workbook's first sheet, as CSV); "
        "the old version is kept in deleted/.",
        widget=forms.ClearableFileInput(attrs={"accept": ACCEPTED_FILES}),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.helper = form_helper("Replace")


class RelocateForm(forms.Form):
    path = forms.CharField(
        label="New storage path",
        max_length=4096,
        help_text="An absolute path on the server, inside a folder the operator set aside for "
        "the storage. It is taken as typed (no ~ or $VARIABLES) and created when missing.",
    )
    move = forms.BooleanField(label="Move existing files to the new path", required=False)
    overwrite = forms.BooleanField(
        label="Overwrite files of the same name at the new path", required=False
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.helper = form_helper("Relocate storage")


class LogSearchForm(forms.Form):
    q = forms.CharField(
        label="Search",
        required=False,
        max_length=500,
        help_text="A regular expression (RE2); leave empty for all lines.",
    )
    order = forms.ChoiceField(
        label="Order",
        choices=[("newest", "Newest first"), ("oldest", "Oldest first")],
        required=False,
    )
    match_case = forms.BooleanField(label="Match case", required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.helper = form_helper("Search", method="get")


class ProcessForm(forms.Form):
    processor = forms.ChoiceField(label="Processor")
    mode = forms.ChoiceField(label="Mode")

    def __init__(self, *args, processors, fixed_mode=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["processor"].choices = [(p.name, p.title) for p in processors.values()]
        modes = [fixed_mode] if fixed_mode else MODES
        self.fields["mode"].choices = [(mode, mode) for mode in modes]
        if fixed_mode:
            self.fields["mode"].help_text = (
                f"The file holds rows that failed in {fixed_mode} mode, so it is processed "
                "in that mode again."
            )
        self.helper = FormHelper()
        self.helper.form_tag = False
