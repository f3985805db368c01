"""The ``mailer`` command line: one module per noun; errors become one stderr line."""
