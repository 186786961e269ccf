# scer-proxy: slim Python base, non-root user, configuration mounted at /etc/scer-proxy/config.toml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scer_proxy ./scer_proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/scer-proxy --create-home scer
USER scer
WORKDIR /var/lib/scer-proxy
ENV SCER_SERVER_LISTEN=0.0.0.0:8080 \
    SCER_STORAGE_PATH=/var/lib/scer-proxy/scer.db
EXPOSE 8080
VOLUME ["/var/lib/scer-proxy"]
ENTRYPOINT ["scer-proxy", "serve"]
CMD ["--config", "/etc/scer-proxy/config.toml"]
