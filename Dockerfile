# courseview: one image for every role (project, serve, produce, dlq).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin courseview

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 courseview
COPY --from=build /src/target/release/courseview /usr/local/bin/courseview
USER courseview
# Two malloc arenas instead of one per core-thread: librdkafka and the driver
# churn multi-MiB buffers across threads, and per-thread arenas keep that
# memory resident (docs/PERFORMANCE.md, peak RSS).
ENV COURSEVIEW_LISTEN=0.0.0.0:8080 COURSEVIEW_LOG_FORMAT=json MALLOC_ARENA_MAX=2
EXPOSE 8080
ENTRYPOINT ["courseview"]
CMD ["serve"]
