# One image for every service; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 GRPC_LISTEN_HOST=0.0.0.0
WORKDIR /app

COPY requirements.lock ./
# Every file checked against the lock's hashes; the project below, unhashed, without deps.
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

COPY pyproject.toml alembic.ini ./
COPY gen gen
COPY servicekit servicekit
COPY user_service user_service
COPY order_service order_service
COPY processor processor
COPY ecommerce_client ecommerce_client
COPY dbschema dbschema
COPY migrations migrations
RUN pip install --no-cache-dir --no-deps .

# A user of its own (not the shared `nobody`), never root. No certificate, key or password is in
# the image (.dockerignore leaves .local/ out): compose mounts them as secrets, which this user
# reads through the group compose adds (SECRETS_GID; see SECURITY.md).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
USER 10001:10001
