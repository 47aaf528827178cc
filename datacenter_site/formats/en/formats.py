# One way to write a moment on every page, in the admin and in mails: ISO dates and the
# 24-hour clock, with the site's time zone (DJANGO_TIME_ZONE) named.
DATETIME_FORMAT = SHORT_DATETIME_FORMAT = "Y-m-d H:i T"
DATE_FORMAT = SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i"
DATETIME_INPUT_FORMATS = ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"]
DATE_INPUT_FORMATS = ["%Y-%m-%d"]
