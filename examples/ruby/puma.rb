# frozen_string_literal: true

# Puma settings for the fortune example; run.sh passes this file with -C.
# The listen address comes from the command line (-b), built from PORT/HOST.

threads 0, Integer(ENV.fetch("PUMA_MAX_THREADS", "16"))
environment ENV.fetch("RACK_ENV", "production")

# On SIGTERM Puma stops accepting, finishes in-flight requests and exits.
# Without this it re-raises SIGTERM after that and the exit status reads as
# "killed by a signal"; a supervising sidecar should see a clean exit 0.
raise_exception_on_sigterm false

# Wait at most this long for in-flight requests on shutdown.
force_shutdown_after Integer(ENV.fetch("SHUTDOWN_TIMEOUT_SECONDS", "10"))
