# The Aviator control plane. Envoy runs elsewhere (gateway or sidecars); this image only serves xDS.
FROM python:3.11-slim AS build
WORKDIR /src
# The base install: `run`, `bootstrap` and `inspect`; no demo or bench extra (no Envoy here).
COPY pyproject.toml README.md LICENSE ./
COPY aviator ./aviator
# The agent's package: the control plane's wheel ships it (the ORCA header its prober reads).
COPY agent/src ./agent/src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home aviator
COPY --from=build /install /usr/local
USER 10001
EXPOSE 18000 18001
ENTRYPOINT ["aviator"]
# In a cluster: watch the API server with the pod's ServiceAccount (deploy/operator). Outside
# one, override the command: `run --source dir:/etc/aviator ...`.
CMD ["run", "--source", "kubernetes", "--xds-address", "0.0.0.0:18000", "--admin-address", "0.0.0.0:18001"]
