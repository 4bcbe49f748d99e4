# libframeshm for C users, plus the C tests and benchmarks. No Python needed.
#
#   make                         build/lib: libframeshm.so.<version> (+ SONAME and dev links),
#                                libframeshm.a, frameshm.pc, the CMake package files
#   make install PREFIX=/usr/local DESTDIR=
#                                headers in include/frameshm/, the library, pkg-config and
#                                CMake files under lib/ (LIBDIR= to choose another)
#   make uninstall PREFIX=... DESTDIR=...
#   make check                   the cmocka suites (tests/c)
#   make bench                   the C benchmarks (bench/)
#   make example                 docs/examples/c against the installed library (PREFIX=...)
#
# How everything is compiled is defined in build.mk (setup.py reads the same file).

TOP := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
include $(TOP)/build.mk

ifeq ($(origin CC),default)
CC := gcc
endif
AR ?= ar
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DESTDIR ?=
BUILD := $(TOP)/build/c

VERSION := $(shell sed -n 's/^\#define FSHM_VERSION_STRING "\(.*\)"/\1/p' $(TOP)/lib/include/frameshm/frameshm.h)
SONAME := libframeshm.so.$(FSHM_SOVERSION)
REALNAME := libframeshm.so.$(VERSION)

# In the .pc, directories under the prefix are written relative to it (${prefix}/lib), so
# that pkg-config --define-prefix can relocate the installed tree.
PC_LIBDIR := $(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))
PC_INCLUDEDIR := $(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))

LIB_OBJ := $(patsubst lib/src/%.c,$(BUILD)/obj/%.o,$(FSHM_LIB_SOURCES))
LIB_CFLAGS := $(FSHM_CSTD) $(FSHM_WARN) $(FSHM_OPT) $(FSHM_LIB_CFLAGS:-I%=-I$(TOP)/%) $(CFLAGS)

.PHONY: all lib install uninstall check bench example clean FORCE
.DELETE_ON_ERROR:

all: lib
lib: $(BUILD)/$(REALNAME) $(BUILD)/libframeshm.a $(BUILD)/frameshm.pc

$(BUILD)/obj:
	@mkdir -p $@

# Objects depend on build.mk too: a change of flags recompiles.
$(BUILD)/obj/%.o: $(TOP)/lib/src/%.c $(TOP)/build.mk | $(BUILD)/obj
	$(CC) $(LIB_CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/$(REALNAME): $(LIB_OBJ)
	$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--no-undefined $(LDFLAGS) $^ -o $@ $(FSHM_LIB_LIBS)
	ln -sf $(REALNAME) $(BUILD)/$(SONAME)
	ln -sf $(SONAME) $(BUILD)/libframeshm.so

# The static archive: what the C tests link (they call internal functions too).
$(BUILD)/libframeshm.a: $(LIB_OBJ)
	rm -f $@
	$(AR) rcs $@ $^

$(BUILD)/frameshm.pc: $(TOP)/Makefile $(TOP)/lib/include/frameshm/frameshm.h FORCE
	@printf '%s\n' \
	  'prefix=$(PREFIX)' 'libdir=$(PC_LIBDIR)' 'includedir=$(PC_INCLUDEDIR)' '' \
	  'Name: frameshm' \
	  'Description: Shared-memory frame and tensor streams between processes (SHM Tensor Pool wire spec v1.2)' \
	  'Version: $(VERSION)' \
	  'Libs: -L$${libdir} -lframeshm' \
	  'Libs.private: -lrt -pthread' \
	  'Cflags: -I$${includedir}' > $@.tmp && (cmp -s $@.tmp $@ && rm $@.tmp || mv $@.tmp $@)

install: lib
	install -d $(DESTDIR)$(INCLUDEDIR)/frameshm $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(LIBDIR)/cmake/frameshm
	install -m 0644 $(addprefix $(TOP)/,$(FSHM_PUBLIC_HEADERS)) $(DESTDIR)$(INCLUDEDIR)/frameshm/
	install -m 0755 $(BUILD)/$(REALNAME) $(DESTDIR)$(LIBDIR)/
	ln -sf $(REALNAME) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libframeshm.so
	install -m 0644 $(BUILD)/libframeshm.a $(DESTDIR)$(LIBDIR)/
	install -m 0644 $(BUILD)/frameshm.pc $(DESTDIR)$(LIBDIR)/pkgconfig/
	sed -e 's|@SONAME@|$(SONAME)|g' -e 's|@VERSION@|$(VERSION)|g' -e 's|@MAJOR@|$(word 1,$(subst ., ,$(VERSION)))|g' \
	  $(TOP)/lib/cmake/frameshmConfig.cmake.in > $(DESTDIR)$(LIBDIR)/cmake/frameshm/frameshmConfig.cmake
	sed -e 's|@VERSION@|$(VERSION)|g' -e 's|@MAJOR@|$(word 1,$(subst ., ,$(VERSION)))|g' \
	  $(TOP)/lib/cmake/frameshmConfigVersion.cmake.in > $(DESTDIR)$(LIBDIR)/cmake/frameshm/frameshmConfigVersion.cmake
	@if [ -z "$(DESTDIR)" ] && command -v ldconfig >/dev/null && [ "$$(id -u)" = 0 ]; then ldconfig; fi

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/frameshm/frameshm.h $(DESTDIR)$(LIBDIR)/$(REALNAME) \
	  $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/libframeshm.so $(DESTDIR)$(LIBDIR)/libframeshm.a \
	  $(DESTDIR)$(LIBDIR)/pkgconfig/frameshm.pc $(DESTDIR)$(LIBDIR)/cmake/frameshm/frameshmConfig*.cmake
	-rmdir $(DESTDIR)$(INCLUDEDIR)/frameshm $(DESTDIR)$(LIBDIR)/cmake/frameshm 2>/dev/null

check: lib
	$(MAKE) -C $(TOP)/tests/c check

bench: lib
	$(MAKE) -C $(TOP)/bench

example:
	$(MAKE) -C $(TOP)/docs/examples/c PKG_CONFIG_PATH=$(DESTDIR)$(LIBDIR)/pkgconfig run

clean:
	rm -rf $(BUILD)
	$(MAKE) -C $(TOP)/tests/c clean

FORCE:

-include $(wildcard $(BUILD)/obj/*.d)
