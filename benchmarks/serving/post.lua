-- wrk script for bench_serving.py: POST one JSON body on every request.
-- The body is read once per wrk thread from the file named by $BENCH_BODY_FILE.
local path = os.getenv("BENCH_BODY_FILE")
if path == nil then
  error("set BENCH_BODY_FILE to a file holding the JSON request body")
end
local f = assert(io.open(path, "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
