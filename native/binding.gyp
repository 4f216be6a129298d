{
  "targets": [
    {
      "target_name": "bitmirror_native",
      "sources": ["bitmirror_native.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
