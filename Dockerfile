# One image for the ElasticJob operator, the driver and the Ray head/worker pods.
#   docker build -t elastic-adascale:0.1.0 .
#   CPU-only image: docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ...
# Not built on the development machine (no container engine there); see docs/kubernetes.md.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay's default health probes run `wget` inside the Ray containers; slim images lack it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 elastic \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin elastic

WORKDIR /opt/elastic
COPY pyproject.toml README.md ./
COPY elastic ./elastic
COPY controller ./controller
COPY examples ./examples
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
 && elastic --help > /dev/null

# Matches runAsUser/runAsGroup in k8s/operator-deployment.yaml.
USER 10001:10001
WORKDIR /home/elastic
ENTRYPOINT ["elastic"]
CMD ["--help"]
