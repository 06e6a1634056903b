# The Aviator control plane. Envoy runs elsewhere (gateway or sidecars); this image only serves xDS.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aviator ./aviator
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
