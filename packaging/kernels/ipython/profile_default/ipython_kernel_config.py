# IPython kernel configuration for kernels started by guestd (IPYTHONDIR points here
# through the python3 kernelspec that packaging/kernels/install.sh writes).
c = get_config()  # noqa: F821 (provided by IPython when it loads this file)

# Tracebacks without ANSI colour escapes: they reach API clients as plain text.
c.InteractiveShell.colors = "nocolor"
# Print long sequences in full in text/plain (no "..." truncation).
c.PlainTextFormatter.max_seq_length = 0
# No "Out[n]" cache growth beyond what users ask for; keep memory small.
c.InteractiveShell.cache_size = 100
