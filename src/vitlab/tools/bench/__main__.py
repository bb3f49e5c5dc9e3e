from vitlab.errors import user_errors_as_messages
from vitlab.tools.bench.cli import main

user_errors_as_messages(main)(None)  # a user error (a bucket that cannot be read, ...): its message, exit code 2
