{
  # bitmirror_rbd (the rbd block driver's librbd binding) is built only where librbd-dev is
  # installed (<rbd/librbd.h>), so that the addon everything else needs builds on any Linux machine.
  "variables": {
    "have_librbd%": "<!(test -f /usr/include/rbd/librbd.h && echo 1 || echo 0)"
  },
  "targets": [
    {
      "target_name": "bitmirror_native",
      "sources": ["bitmirror_native.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ],
  "conditions": [
    ["have_librbd==1", {
      "targets": [
        {
          "target_name": "bitmirror_rbd",
          "sources": ["bitmirror_rbd.c"],
          "cflags": ["-Wall", "-Wextra", "-O2"],
          "defines": ["NAPI_VERSION=8"],
          "libraries": ["-lrbd", "-lrados"]
        }
      ]
    }]
  ]
}
